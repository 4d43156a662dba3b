"""Functions local lmms-eval task YAMLs of the tests name with ``!function lmms_tasks.…``."""


def doc_to_video(doc):
    return [doc["video"]]
