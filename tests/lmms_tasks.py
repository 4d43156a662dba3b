"""Local lmms-eval tasks over the demo's validation samples, in LLaVA-Interleave-Bench's layout,
and the functions their YAMLs name with ``!function lmms_tasks.…``."""

from __future__ import annotations

import json
from pathlib import Path

IMAGE_PLACEHOLDER = "<image>"
BENCH_UTILS = "lmms_eval.tasks.llava_interleave_bench.utils"
# demo tasks -> bench sub-tasks (two of one category, so the category mean weights by size)
SUB_TASKS = {"demo_colour": "QBench", "demo_shape": "Spot-the-Diff", "demo_odd_one": "Birds-to-Words",
             "demo_motion": "Mantis"}  # fmt: skip


def doc_to_video(doc):
    return [doc["video"]]


def _local(name: str, data_file: Path) -> str:
    """A task reading one local JSON file (offline: no hub)."""
    return f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
"""


def task_yaml(name: str, data_file: Path, visual: str, text: str = f"{BENCH_UTILS}.doc_to_text") -> str:
    return (
        _local(name, data_file)
        + f"""output_type: generate_until
doc_to_visual: !function {visual}
doc_to_text: !function {text}
doc_to_target: answer
process_results: !function {BENCH_UTILS}.interleave_process_results
metric_list:
  - metric: overall_score
    aggregation: !function {BENCH_UTILS}.overall_score
    higher_is_better: true
generation_kwargs:
  max_new_tokens: 16
  temperature: 0
  do_sample: false
"""
    )


def write_demo_tasks(data: Path, out: Path) -> dict:
    """Tasks ``mm_images`` and ``mm_videos`` (every other question without placeholders: its
    images go in front) over ``data``'s raw validation records, and the same records as LLaVA
    annotations (``annotations``) for ``mmscene data convert``."""
    media = data / "raw" / "media"
    images, videos, annotations = [], [], []
    for i, line in enumerate((data / "raw" / "val.jsonl").read_text().splitlines()):
        r = json.loads(line)
        task = r["metadata"]["dataset"]
        if task not in SUB_TASKS:
            continue
        question, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
        if i % 2:
            question = question.replace(f"{IMAGE_PLACEHOLDER}\n", "").replace(IMAGE_PLACEHOLDER, "")
        row = {"sample_id": r["id"], "sub_task": SUB_TASKS[task], "question": question, "answer": answer,
               "question_type": r["metadata"]["question_type"]}  # fmt: skip
        if "video" in r:
            videos.append({**row, "video": str(media / r["video"])})
        else:
            images.append({**row, **{f"image_{k}": str(media / p) for k, p in enumerate(r["image"])}})
        annotations.append({"id": r["id"], **{k: r[k] for k in ("image", "video") if k in r},
                            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
                            "metadata": {"dataset": SUB_TASKS[task], "question_type": row["question_type"]}})  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "images.json").write_text(json.dumps(images))
    (out / "videos.json").write_text(json.dumps(videos))
    (out / "images.yaml").write_text(
        task_yaml("mm_images", out / "images.json", f"{BENCH_UTILS}.doc_to_visual")
    )
    (out / "videos.yaml").write_text(task_yaml("mm_videos", out / "videos.json", "lmms_tasks.doc_to_video"))
    return {"images": images, "videos": videos, "annotations": annotations, "media": media}


def doc_to_choice(doc):
    return doc["choices"]


def choice_task_yaml(name: str, data_file: Path) -> str:
    """Options scored by likelihood (lmms-eval's ``multiple_choice`` output type)."""
    return (
        _local(name, data_file)
        + f"""output_type: multiple_choice
doc_to_visual: !function {BENCH_UTILS}.doc_to_visual
doc_to_text: question
doc_to_choice: !function lmms_tasks.doc_to_choice
doc_to_target: target
metric_list:
  - metric: acc
"""
    )


def two_rounds_text(
    doc, lmms_eval_specific_kwargs=None, previous_output=None, round_idx=None, previous_round_info=None
):
    """Round 0 asks the question; round 1 asks again in other words; round 2 ends the dialogue."""
    if not round_idx:
        return doc["question"]
    if round_idx >= 2:
        return None, None, True, list(previous_output), previous_round_info
    return None, "Say it again.", False, list(previous_output), previous_round_info


def two_rounds_results(doc, results):
    return {"rounds": len(results[0])}


def multi_round_task_yaml(name: str, data_file: Path) -> str:
    return (
        _local(name, data_file)
        + f"""output_type: generate_until_multi_round
doc_to_visual: !function {BENCH_UTILS}.doc_to_visual
doc_to_text: !function lmms_tasks.two_rounds_text
doc_to_target: answer
process_results: !function lmms_tasks.two_rounds_results
metric_list:
  - metric: rounds
    aggregation: mean
generation_kwargs:
  max_new_tokens: 8
  do_sample: false
"""
    )
