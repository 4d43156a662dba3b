"""The ``lmms_eval.models`` entry point: lmms-eval calls this to learn the ``mmscene`` model."""

from __future__ import annotations


def lmms_eval_models():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest("mmscene", simple_class_path="mmscene.eval.lmms_model.MMSceneLMM")
