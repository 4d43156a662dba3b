"""The LLaVA-Interleave-Bench row layout (lmms-eval task ``llava_interleave_bench``).

A bench row (``in_domain`` / ``out_of_domain`` / ``multi_view_in_domain``) holds ``sample_id``,
``sub_task``, ``question``, ``answer``, ``question_type`` and image slots ``image_0`` ..
``image_15``. A slot is a path relative to the media root, embedded bytes (Parquet from HF
``datasets``: a struct ``{"bytes": b"...", "path": "name.jpg"}``; JSON: ``{"bytes": "<base64>"}``)
or ``None`` (no image there). Any other field goes to the record's metadata (unless null).

:func:`bench_record` turns a row into the LLaVA / M4-Instruct record that
:mod:`mmscene.data.ingest.records` prepares, with embedded images as :class:`InlineImage` (a type
no JSON file can produce, so the LLaVA layout itself gains no embedded form).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from mmscene.metrics.interleave_bench import MULTI_VIEW_SUB_TASKS, is_multi_view
from mmscene.skips import SkipSample

__all__ = [
    "BENCH",
    "LAYOUTS",
    "LLAVA",
    "MULTI_VIEW_SUB_TASKS",
    "InlineImage",
    "bench_record",
    "bench_scenario",
    "is_bench_row",
]

LLAVA, BENCH = "llava", "interleave-bench"
LAYOUTS = ("auto", LLAVA, BENCH)
SLOTS = 16  # lmms-eval's doc_to_visual reads image_0 .. image_15
REQUIRED = ("sample_id", "sub_task", "question", "answer")
_QUESTION_TYPES = ("multi-choice", "open-ended")
_SLOT = re.compile(r"^image_(0|[1-9][0-9]*)$")


@dataclasses.dataclass(frozen=True)
class InlineImage:
    """Image bytes carried by the row itself, from slot ``slot`` (``image_N``); ``path`` is the
    file name the row gives with them, if any (HF ``datasets`` keeps the original one there)."""

    data: bytes
    slot: str
    path: str | None = None

    @property
    def source(self) -> str:
        """What the media entry's ``source`` says: the row's file name, else the slot."""
        return self.path or self.slot


def _slot(key: Any) -> int | None:
    match = _SLOT.match(key) if isinstance(key, str) else None
    return int(match.group(1)) if match else None


def is_bench_row(row: Any) -> bool:
    """A row in the bench layout: ``sample_id``, ``sub_task``, ``question``, ``answer`` and ``image_N`` keys."""
    return (
        isinstance(row, Mapping)
        and all(key in row for key in REQUIRED)
        and any(_slot(key) is not None for key in row)
    )


def bench_scenario(row: Mapping[str, Any]) -> str:
    """``3d`` for the bench's multi-view sub_tasks, ``multi_image`` for every other (one image too)."""
    return "3d" if is_multi_view(row.get("sub_task")) else "multi_image"


def _image(value: Any, slot: str) -> str | InlineImage | None:
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, (bytes, bytearray)):  # a plain binary Parquet column
        return InlineImage(bytes(value), slot)
    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):
        data, path = value.get("bytes"), value.get("path")
        name = path if isinstance(path, str) and path else None
        if isinstance(data, (bytes, bytearray)):
            return InlineImage(bytes(data), slot, name)
        if isinstance(data, str):
            try:
                return InlineImage(base64.b64decode(data, validate=True), slot, name)
            except binascii.Error as err:
                raise SkipSample("corrupt_media", f"{slot}: 'bytes' is not base64 ({err})") from err
        if data is None and (path is None or isinstance(path, str)):  # HF datasets: an image kept as a file
            return path or None
    raise SkipSample("bad_record", f"{slot} must be a path, {{'bytes': ...}} or null")


def bench_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """The LLaVA-layout record of a bench row (``image``: paths and :class:`InlineImage` in slot order).

    Raises :class:`SkipSample` (``bad_record``) for missing fields, a ``sub_task`` that is not a
    string, an unknown ``question_type`` (the bench's scoring depends on it, so it is not defaulted)
    or a slot past ``image_15``; bad base64 is ``corrupt_media``.
    """
    missing = [key for key in REQUIRED if key not in row]
    if missing:
        raise SkipSample("bad_record", f"bench row without {', '.join(missing)}")
    sub_task, sample_id = row["sub_task"], row["sample_id"]
    if not isinstance(sub_task, str) or not sub_task:
        raise SkipSample("bad_record", "'sub_task' must be a non-empty string")
    if sample_id is None:
        raise SkipSample("bad_record", "'sample_id' is null")
    raw_type = row.get("question_type")
    question_type = re.sub(r"[\s_]+", "-", raw_type.strip().lower()) if isinstance(raw_type, str) else None
    question_type = {"multiple-choice": "multi-choice"}.get(question_type, question_type)
    if question_type not in _QUESTION_TYPES:
        raise SkipSample("bad_record", f"question_type {raw_type!r} is not one of {_QUESTION_TYPES}")

    slots: dict[int, Any] = {}
    extras: dict[str, Any] = {}
    for key, value in row.items():
        n = _slot(key)
        if n is None:
            # null extras are dropped: a Parquet file has every column in every row
            if key not in (*REQUIRED, "question_type") and value is not None:
                extras[key] = value
        elif n >= SLOTS:
            if value is not None:
                raise SkipSample("bad_record", f"{key}: the bench has {SLOTS} image slots (image_0..)")
        else:
            slots[n] = value
    images = [_image(slots[n], f"image_{n}") for n in sorted(slots)]
    metadata = {
        **extras,
        "dataset": sub_task,
        "sub_task": sub_task,
        "sample_id": sample_id,
        "question_type": question_type,
    }
    return {
        "id": sample_id,
        "image": [image for image in images if image is not None],
        "conversations": [
            {"from": "human", "value": row["question"]},
            {"from": "gpt", "value": row["answer"]},
        ],
        "metadata": metadata,
    }
