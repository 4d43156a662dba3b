"""One annotation record → a validated shard sample (record + media members), or why not.

Scenario inference by dataset rules, conversation checks (roles, turns, placeholders) and the
media of each kind; :func:`prepare` is the picklable entry point of the converter's worker pool.
LLaVA-Interleave-Bench rows are mapped to the LLaVA layout first
(:mod:`mmscene.data.ingest.interleave_bench`), their embedded images kept in memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from mmscene.constants import front_images
from mmscene.data.ingest.annotations import Item
from mmscene.data.ingest.interleave_bench import (
    LLAVA,
    InlineImage,
    bench_record,
    bench_scenario,
    is_bench_row,
)
from mmscene.data.ingest.media_files import (
    IMAGE_FILES,
    MESH_TYPES,
    check_image,
    check_mesh,
    check_video,
    error_detail,
    existing_file,
    mesh_side_files,
    read_file,
)
from mmscene.scenario import IMAGE_PLACEHOLDER, SkipSample
from mmscene.schema import make_record

SINGLE_IMAGE, MULTI_IMAGE, VIDEO, THREE_D = "single_image", "multi_image", "video", "3d"
AUTO = "auto"


# Dataset-name rules: case-insensitive substring of metadata.dataset, the id or an image path.
# These datasets ship 3D scenes as sets of rendered / captured views under "image".
DEFAULT_RULES: dict[str, str] = {
    "scanqa": THREE_D,
    "scannet": THREE_D,
    "alfred": THREE_D,
    "nuscenes": THREE_D,
    "3d-llm": THREE_D,
}

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_QUESTION_TYPES = {
    "multi-choice": "multi-choice",
    "multiple-choice": "multi-choice",
    "multichoice": "multi-choice",
    "mcq": "multi-choice",
    "open-ended": "open-ended",
    "openended": "open-ended",
    "open": "open-ended",
}


# -- scenario inference ------------------------------------------------------------------------
def _as_paths(value: Any) -> list[Any]:
    if value is None or value == "" or value == []:
        return []
    return value if isinstance(value, list) else [value]


def ordered_rules(dataset_rules: Mapping[str, str] | None = None) -> tuple[tuple[str, str], ...]:
    """User rules first (they override), then the defaults; longer (more specific) patterns first."""
    user = {k.lower(): v for k, v in (dataset_rules or {}).items()}
    defaults = {k: v for k, v in DEFAULT_RULES.items() if k not in user}

    def order(rules: dict[str, str]) -> list[tuple[str, str]]:
        return sorted(rules.items(), key=lambda kv: (-len(kv[0]), kv[0]))

    return tuple(order(user) + order(defaults))


def infer_scenario(record: Mapping[str, Any], rules: Iterable[tuple[str, str]] | None = None) -> str | None:
    """The scenario of a raw annotation record, or None when it has no media.

    ``video`` -> video; ``mesh`` -> 3d; image records: the first dataset rule whose pattern is a
    case-insensitive substring of ``metadata.dataset``, the id or an image path; else one image ->
    single_image, several -> multi_image. ``rules`` is :func:`ordered_rules`' output (defaults if None).
    """
    if record.get("video"):
        return VIDEO
    if record.get("mesh"):
        return THREE_D
    images = _as_paths(record.get("image"))
    if not images:
        return None
    metadata = record.get("metadata")
    dataset = metadata.get("dataset") if isinstance(metadata, dict) else None
    sample_id = record.get("id", record.get("sample_id"))
    haystack = [str(x).lower() for x in (dataset, sample_id, *images) if x is not None]
    for pattern, scenario in ordered_rules() if rules is None else rules:
        if any(pattern in text for text in haystack):
            return scenario
    return SINGLE_IMAGE if len(images) == 1 else MULTI_IMAGE


# -- one record ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RecordContext:
    media_root: str  # absolute and normalised
    scenario: str  # "auto" or the forced scenario
    rules: tuple[tuple[str, str], ...]
    source_file: str
    layout: str = AUTO  # "auto" (per record), "llava" or "interleave-bench"


@dataclasses.dataclass
class Prepared:
    """A record after validation: the shard members to write, or why it was rejected."""

    index: int
    offset: int
    scenario: str | None = None
    id: str | None = None
    record: dict[str, Any] | None = None
    members: list[tuple[str, bytes]] = dataclasses.field(default_factory=list)
    fixes: list[str] = dataclasses.field(default_factory=list)
    reason: str = ""
    detail: str = ""
    raw: Any = None  # the original record, kept only for rejects (rejected.jsonl)


def prepare(ctx: RecordContext, item: Item) -> Prepared:
    """Validate one record and read its media. Picklable entry point of the worker pool."""
    result = Prepared(item.index, item.offset, raw=item.record)
    if item.error:
        result.reason, result.detail = "bad_json", item.error
        return result
    try:
        _prepare(ctx, item, result)
    except SkipSample as skip:
        result.reason, result.detail = skip.reason, skip.detail
        result.record, result.members, result.fixes = None, [], []
        return result
    result.raw = None  # written samples need not ship the original back to the parent
    return result


def _paths(value: Any, field: str) -> list[Any]:
    paths = _as_paths(value)
    # InlineImage: a bench row's embedded image (no JSON value parses as one)
    if not all(
        (isinstance(p, str) and p) or (field == "image" and isinstance(p, InlineImage)) for p in paths
    ):
        raise SkipSample("bad_record", f"{field!r} must be a path or a list of paths")
    return paths


def _conversation(turns: Any) -> list[dict[str, str]]:
    if turns is None or turns == []:
        raise SkipSample("no_conversation", "no conversations")
    if not isinstance(turns, list):
        raise SkipSample("bad_record", "'conversations' must be a list")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise SkipSample("bad_record", f"conversations[{i}] is not an object")
        role, value = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
        if not isinstance(value, str):
            raise SkipSample("bad_record", f"conversations[{i}] has no string 'value'")
        mapped = ROLE_MAP.get(role.lower()) if isinstance(role, str) else None
        if mapped is None:
            raise SkipSample("bad_roles", f"conversations[{i}] has role {role!r}")
        out.append({"role": mapped, "content": value})
    body = out[1:] if out and out[0]["role"] == "system" else out
    if not body:
        raise SkipSample("no_conversation", "only a system turn")
    for i, turn in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn["role"] != expected:
            offset = len(out) - len(body)
            raise SkipSample(
                "bad_roles", f"conversations[{i + offset}] is {turn['role']}, expected {expected}"
            )
    if body[-1]["role"] != "assistant":
        raise SkipSample("bad_roles", "conversation ends on a human turn")
    return out


def _prepare(ctx: RecordContext, item: Item, result: Prepared) -> None:
    raw = item.record
    if not isinstance(raw, dict):
        raise SkipSample("bad_record", f"record is a JSON {type(raw).__name__}, not an object")
    sample_id = raw.get("id", raw.get("sample_id"))
    result.id = str(sample_id) if sample_id is not None else f"record-{item.index}"
    bench = ctx.layout != LLAVA and (ctx.layout != AUTO or is_bench_row(raw))
    if bench:  # scenario by sub_task, not by the dataset rules
        result.scenario = bench_scenario(raw) if ctx.scenario == AUTO else ctx.scenario
        raw = bench_record(raw)
    else:
        result.scenario = infer_scenario(raw, ctx.rules) if ctx.scenario == AUTO else ctx.scenario

    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise SkipSample("bad_record", "'metadata' must be an object")
    images = _paths(raw.get("image"), "image")
    (video, *extra_video) = _paths(raw.get("video"), "video") or [None]
    (mesh, *extra_mesh) = _paths(raw.get("mesh"), "mesh") or [None]
    if extra_video or extra_mesh:
        raise SkipSample("bad_record", "'video' and 'mesh' take one path each")
    conversation = _conversation(raw.get("conversations"))

    kinds = [kind for kind, present in (("image", images), ("video", video), ("mesh", mesh)) if present]
    if not kinds:
        raise SkipSample("no_media", "no image, video or mesh")
    if len(kinds) > 1:
        raise SkipSample("mixed_media", f"record has {' and '.join(kinds)}")
    ext = os.path.splitext(video or mesh or "")[1].lower().lstrip(".")
    if video and not re.fullmatch(r"[a-z0-9]+", ext):
        raise SkipSample("unsupported_media", f"video {video!r} has no usable extension")
    if mesh and ext not in MESH_TYPES:
        raise SkipSample("unsupported_media", f"mesh {mesh!r}: type {ext!r} not in {MESH_TYPES}")

    placeholders = sum(turn["content"].count(IMAGE_PLACEHOLDER) for turn in conversation)
    if images:
        if placeholders == 0:
            # as LLaVA's evaluation code (and lmms-eval's LLaVA models) do for questions without them
            first_user = next(turn for turn in conversation if turn["role"] == "user")
            first_user["content"] = f"{front_images(len(images))}\n" + first_user["content"]
            result.fixes.append("placeholders_prepended")
        elif placeholders != len(images):
            raise SkipSample(
                "placeholder_mismatch", f"{placeholders} {IMAGE_PLACEHOLDER} for {len(images)} images"
            )
    elif placeholders > 1:
        raise SkipSample(
            "placeholder_mismatch", f"{placeholders} {IMAGE_PLACEHOLDER} for one {kinds[0]} (0 or 1 expected)"
        )

    question_type = metadata.get("question_type")
    question_type = _QUESTION_TYPES.get(re.sub(r"[\s_]+", "-", str(question_type).strip().lower()))
    if question_type is None:
        question_type = "open-ended"
        result.fixes.append("question_type_defaulted")
    task = (
        metadata.get("dataset") if isinstance(metadata.get("dataset"), str) and metadata["dataset"] else None
    )

    poses = raw.get("poses")
    if poses is not None and (not isinstance(poses, list) or (images and len(poses) != len(images))):
        raise SkipSample("bad_record", "'poses' must be a list with one 4x4 matrix per image")

    root = ctx.media_root
    media: list[dict[str, Any]] = []
    members: list[tuple[str, bytes]] = []
    # resolve every path before reading anything: cheap checks first
    fulls = (
        [p if isinstance(p, InlineImage) else existing_file(root, p, "image") for p in images]
        if images
        else [existing_file(root, video or mesh, kinds[0])]
    )
    if images:
        for i, full in enumerate(fulls):
            if isinstance(full, InlineImage):  # checked like a file's bytes; the detail names the slot
                data, source = full.data, full.source
                try:
                    ext = check_image(data)
                except SkipSample as skip:
                    raise SkipSample(skip.reason, f"{full.slot}: {skip.detail}") from skip
            else:
                data, source = read_file(full), os.path.relpath(full, root)
                ext = check_image(data)
            member = f"{i}.{ext}"
            media.append({"member": member, "type": "image", "source": source})
            members.append((member, data))
    elif video:
        data = read_file(fulls[0])
        check_video(data)
        media.append({"member": ext, "type": "video", "source": os.path.relpath(fulls[0], root)})
        members.append((ext, data))
    else:
        data = read_file(fulls[0])
        assets: dict[str, str] = {}
        asset_bytes: dict[str, bytes] = {}
        asset_members: list[tuple[str, bytes]] = []
        for j, (name, full) in enumerate(mesh_side_files(root, fulls[0], ext, data)):
            side = read_file(full)
            if full.lower().endswith(IMAGE_FILES):
                check_image(side)  # trimesh silently drops textures it cannot decode
            suffix = f"asset{j}.{re.sub(r'[^a-z0-9]', '', os.path.splitext(full)[1].lower()) or 'bin'}"
            assets[name], asset_bytes[name] = suffix, side
            asset_members.append((suffix, side))
        check_mesh(data, ext, asset_bytes)
        entry: dict[str, Any] = {"member": ext, "type": "mesh", "source": os.path.relpath(fulls[0], root)}
        if assets:
            entry["assets"] = assets
        media.append(entry)
        members += [(ext, data), *asset_members]
    for entry in media:
        entry["source"] = entry["source"].replace(os.sep, "/")

    assert result.scenario is not None  # media present, so inference found one
    record = make_record(
        id=result.id,
        scenario=result.scenario,
        task=task or "default",
        question_type=question_type,
        conversations=conversation,
        media=media,
        metadata=metadata,
        source={"file": ctx.source_file, "index": item.index},
        poses=poses,
    )
    try:
        doc = json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate: JSON escapes allow it, Unicode text does not
        raise SkipSample("bad_record", f"text is not valid Unicode: {error_detail(err)}") from err
    except TypeError as err:  # bytes outside an image slot (a Parquet binary column)
        raise SkipSample("bad_record", f"a field is not JSON: {error_detail(err)}") from err
    result.record = record
    result.members = [("json", doc), *members]


# -- the conversion ------------------------------------------------------------------------------
