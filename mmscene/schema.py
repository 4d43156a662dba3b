"""The ``KEY.json`` document of a shard sample, schema version 1.

Written by ``mmscene data convert`` and read by every scenario loader. Validation is a small
hand-written check rather than a JSON-Schema engine: a dozen fields, and the error messages must
name the sample and the field for the skip report.
"""

from __future__ import annotations

from typing import Any

from mmscene.constants import ROLES
from mmscene.skips import SkipSample

SCHEMA_VERSION = 1
MEDIA_TYPES = ("image", "video", "mesh")
QUESTION_TYPES = ("multi-choice", "open-ended")

# Published in docs/data-format.md; kept here as the single source of truth.
JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "mmscene.sample.v1",
    "type": "object",
    "required": ["schema_version", "id", "scenario", "task", "question_type", "conversations", "media"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "id": {"type": "string"},
        "scenario": {"type": "string"},
        "task": {"type": "string", "description": "dataset or task category, scored separately"},
        "question_type": {"enum": list(QUESTION_TYPES)},
        "conversations": {
            "type": "array",
            "minItems": 2,
            "items": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {"role": {"enum": list(ROLES)}, "content": {"type": "string"}},
            },
        },
        "media": {
            "type": "array",
            "description": "in placeholder order; member is the tar member suffix after 'KEY.'",
            "items": {
                "type": "object",
                "required": ["member", "type"],
                "properties": {
                    "member": {"type": "string"},
                    "type": {"enum": list(MEDIA_TYPES)},
                    "source": {"type": "string", "description": "path relative to the media root"},
                    "assets": {
                        "type": "object",
                        "description": "mesh side files: file name the mesh refers to -> member suffix",
                        "additionalProperties": {"type": "string"},
                    },
                },
            },
        },
        "poses": {"type": "array", "description": "optional 4x4 camera-to-world matrices, one per view"},
        "metadata": {"type": "object"},
        "source": {"type": "object", "description": "annotation file and record index it came from"},
    },
}


def validate_record(record: Any) -> None:
    """Raise :class:`SkipSample` (reason ``bad_record``) naming the first problem found."""

    def bad(msg: str) -> SkipSample:
        return SkipSample(
            "bad_record", f"{record.get('id', '?') if isinstance(record, dict) else '?'}: {msg}"
        )

    if not isinstance(record, dict):
        raise SkipSample("bad_record", "sample json is not an object")
    version = record.get("schema_version")
    if version != SCHEMA_VERSION:
        raise bad(f"schema_version {version!r}, this mmscene reads {SCHEMA_VERSION}")
    for field in JSON_SCHEMA["required"]:
        if field not in record:
            raise bad(f"missing field {field!r}")
    for field in ("id", "scenario", "task"):
        if not isinstance(record[field], str):
            raise bad(f"{field} must be a string")
    if record["question_type"] not in QUESTION_TYPES:
        raise bad(f"question_type {record['question_type']!r} not in {QUESTION_TYPES}")
    turns = record["conversations"]
    if not isinstance(turns, list) or len(turns) < 2:
        raise bad("conversations needs at least one user and one assistant turn")
    for i, turn in enumerate(turns):
        if (
            not isinstance(turn, dict)
            or turn.get("role") not in ROLES
            or not isinstance(turn.get("content"), str)
        ):
            raise bad(f"conversations[{i}] must be {{'role': {ROLES}, 'content': str}}")
    media = record["media"]
    if not isinstance(media, list):
        raise bad("media must be a list")
    for i, item in enumerate(media):
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("member"), str)
            or item.get("type") not in MEDIA_TYPES
        ):
            raise bad(f"media[{i}] must be {{'member': str, 'type': {MEDIA_TYPES}}}")


def make_record(
    *,
    id: str,
    scenario: str,
    task: str,
    question_type: str,
    conversations: list[dict[str, str]],
    media: list[dict[str, Any]],
    metadata: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    poses: list | None = None,
) -> dict[str, Any]:
    record = {
        "schema_version": SCHEMA_VERSION,
        "id": id,
        "scenario": scenario,
        "task": task,
        "question_type": question_type,
        "conversations": conversations,
        "media": media,
        "metadata": metadata or {},
        "source": source or {},
    }
    if poses is not None:
        record["poses"] = poses
    validate_record(record)
    return record
