"""Prompts for ``mmscene predict``: a JSONL of questions with media paths → shards to answer.

Each line is ``{"id": ..., "image": path | [paths] | "video": path | "mesh": path,
"prompt": "…<image>…"}`` or a LLaVA record whose ``conversations`` end with a human turn (or a
gpt turn, kept as the reference answer). The rows go through the same converter as training
data, so media checks, root confinement, scenario inference and the reject report are shared.
"""

from __future__ import annotations

import json
from pathlib import Path

from mmscene.data.ingest.convert import convert


def _as_annotation(row: dict, index: int) -> dict:
    row = dict(row)
    if "prompt" in row:
        prompt = row.pop("prompt")
        if not isinstance(prompt, str):
            raise ValueError(f"prompts line {index + 1}: 'prompt' must be a string")
        row["conversations"] = [{"from": "human", "value": prompt}]
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"prompts line {index + 1}: needs 'prompt' or 'conversations'")
    if turns[-1].get("from", turns[-1].get("role")) in ("human", "user"):
        row["conversations"] = [*turns, {"from": "gpt", "value": ""}]  # the answer to generate
    row.setdefault("id", f"prompt-{index:06d}")
    return row


def prompts_to_shards(prompts: Path | str, media_root: Path | str, out: Path | str) -> dict:
    """Write the prompts as shards under ``out``; returns the converter's report."""
    prompts, out = Path(prompts), Path(out)
    if not prompts.is_file():
        raise FileNotFoundError(f"prompts file {prompts} not found")
    out.mkdir(parents=True, exist_ok=True)
    annotations = out / "prompts.annotations.jsonl"
    with open(prompts) as src, open(annotations, "w") as dst:
        for i, line in enumerate(src):
            if line.strip():
                dst.write(json.dumps(_as_annotation(json.loads(line), i)) + "\n")
    return convert(annotations, media_root, out / "shards", progress=False, overwrite=True, keep_order=True)
