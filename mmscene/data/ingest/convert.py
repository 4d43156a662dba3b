"""``mmscene data convert``: LLaVA / M4-Instruct annotations -> WebDataset shards grouped by scenario.

The annotation file is streamed (:mod:`mmscene.data.ingest.annotations`: a ``.json`` top-level array
element by element, a ``.jsonl`` line by line), each record is validated and its media read as original bytes, and the
good ones are written to ``OUT/<scenario>/shard-NNNNNN.tar``; the rest go to ``OUT/rejected.jsonl``
with a stable reason slug, and ``OUT/report.json`` counts both. See ``docs/data-format.md``.

With ``workers > 1`` the per-record work (validation, reading and decoding media) runs in a process
pool; results are consumed in order, so keys and shards are identical to a 1-worker run.

Records are written in a seeded random order by default: annotation files list each
sub-dataset's samples together, and shards written in that order would give loader workers long
runs of one sub-dataset. ``keep_order`` writes them as listed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor, ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile

from mmscene.data.ingest.annotations import Item, iter_annotations, json_line, shuffled_annotations
from mmscene.data.ingest.report import UNKNOWN_SCENARIO, ConvertReport
from mmscene.data.ingest.shard_writer import KeyAllocator, ShardWriter
from mmscene.data.media.decode import MAX_IMAGE_PIXELS
from mmscene.data.shards import INDEX_NAME, SHARD_GLOB
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

# The same limit the loaders apply (mmscene.data.media.decode), so nothing converted is refused later.
BOMB_PIXELS = MAX_IMAGE_PIXELS
MESH_TYPES = ("obj", "glb", "gltf", "ply", "stl", "off")
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
# Member suffix from the decoded format, not the file name: a PNG saved as .jpg is stored as .png.
_IMAGE_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "TIFF": "tiff", "JPEG2000": "jp2", "WEBP": "webp"}
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_MTLLIB = re.compile(rb"^[ \t]*mtllib[ \t]+(.+?)[ \t]*\r?$", re.MULTILINE | re.IGNORECASE)
# .mtl statements that name a texture file
_MTL_MAPS = frozenset(
    [
        "map_kd",
        "map_ka",
        "map_ks",
        "map_ns",
        "map_d",
        "map_tr",
        "map_bump",
        "bump",
        "disp",
        "decal",
        "norm",
        "refl",
        "map_pr",
        "map_pm",
        "map_ps",
        "map_ke",
        "map_rma",
        "map_orm",
    ]
)
_IMAGE_FILES = (".png", ".jpg", ".jpeg", ".bmp", ".tga", ".tif", ".tiff", ".webp", ".gif")


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


# -- media checks (run in the workers) ---------------------------------------------------------
def _detail(err: BaseException, limit: int = 200) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) <= limit else text[:limit] + "..."


@contextlib.contextmanager
def _strict_pil() -> Iterator[None]:
    # Our own pixel limit decides (not whatever the process set globally), and truncated files
    # must fail rather than decode as grey bands.
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def check_image(data: bytes) -> str:
    """Check image bytes fully decode; returns the member extension of the real format."""
    if not data:
        raise SkipSample("corrupt_media", "empty image file")
    with _strict_pil():
        try:
            with Image.open(io.BytesIO(data)) as img:
                fmt, (width, height) = img.format or "", img.size
                if width * height > BOMB_PIXELS:
                    raise SkipSample("bomb", f"{width}x{height} pixels (limit {BOMB_PIXELS})")
                img.verify()  # checksums (PNG); does not decode pixels
            with Image.open(io.BytesIO(data)) as img:
                img.load()  # truncated JPEGs only fail here
        except SkipSample:
            raise
        except Exception as err:  # noqa: BLE001 - codecs raise anything on bad bytes
            raise SkipSample("corrupt_media", _detail(err)) from err
    return _IMAGE_EXT.get(fmt, re.sub(r"[^a-z0-9]", "", fmt.lower()) or "img")


def check_video(data: bytes) -> None:
    """Open the video from memory with decord and decode its first frame.

    Opening walks the container's packet index, which already fails on files cut short (whether
    the index sits before or after the media data). The last frame is not decoded on purpose:
    seeking there decodes a whole GOP, ~0.5 s for a 720p clip, which dominates a conversion.
    """
    import decord  # imported here: its start-up is only paid when there are videos

    if not data:
        raise SkipSample("corrupt_media", "empty video file")
    try:
        reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
        if len(reader) <= 0:
            raise SkipSample("corrupt_media", "video has no frames")
        reader.get_batch([0]).asnumpy()
    except SkipSample:
        raise
    except Exception as err:  # noqa: BLE001 - decord raises RuntimeError/DECORDError
        raise SkipSample("corrupt_media", _detail(err)) from err


def _memory_resolver(files: Mapping[str, bytes]) -> Any:
    """A trimesh resolver that serves only the side files collected for the mesh (never the disk)."""
    from trimesh.resolvers import Resolver

    class _Files(Resolver):
        def __init__(self, files: Mapping[str, bytes]):
            self.files = dict(files)

        def get(self, key: str) -> bytes:
            return self.files[key]

        def write(self, name: str, data: Any) -> None:
            raise PermissionError("read-only resolver")

        def namespaced(self, namespace: str) -> _Files:
            prefix = namespace.rstrip("/") + "/"
            return _Files({k[len(prefix) :]: v for k, v in self.files.items() if k.startswith(prefix)})

        def keys(self):
            return self.files.keys()

    return _Files(files)


def check_mesh(data: bytes, file_type: str, assets: Mapping[str, bytes]) -> None:
    """Load the mesh / point cloud with trimesh (side files from ``assets``); it must hold vertices."""
    import numpy as np
    import trimesh

    try:
        scene = trimesh.load_scene(io.BytesIO(data), file_type=file_type, resolver=_memory_resolver(assets))
    except Exception as err:  # noqa: BLE001 - trimesh's parsers raise whatever bad input provokes
        raise SkipSample("corrupt_media", _detail(err)) from err
    vertices = [getattr(g, "vertices", None) for g in scene.geometry.values()]
    if not any(v is not None and len(v) and np.isfinite(v).all() for v in vertices):
        # garbage text parses as an empty OBJ scene instead of failing
        raise SkipSample("corrupt_media", f"{file_type} file holds no geometry")


# -- paths -------------------------------------------------------------------------------------
def resolve_media_path(root: str, rel: str) -> str:
    """``root/rel``, refusing absolute paths and ``..`` that leave ``root``.

    The check is lexical on purpose: symlinks inside the media root (a common way to assemble a
    dataset from several disks) are trusted, as the user put them there.
    """
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:[\\/]", rel):
        raise SkipSample("path_escapes_root", f"absolute path {rel!r}")
    full = os.path.normpath(os.path.join(root, rel))
    if not full.startswith(root.rstrip(os.sep) + os.sep):
        raise SkipSample("path_escapes_root", f"{rel!r} resolves outside the media root")
    return full


def _existing(root: str, rel: str, what: str) -> str:
    full = resolve_media_path(root, rel)
    if not os.path.isfile(full):
        raise SkipSample("missing_media", f"{what} {rel!r} not found")
    return full


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise SkipSample("missing_media", _detail(err)) from err


def _find_side_file(root: str, names: list[str], dirs: list[str], referrer: str) -> tuple[str, str]:
    """The first of ``names`` (spellings of one reference) that exists in one of ``dirs``."""
    escaped = ""
    for name in names:
        for directory in dirs:
            try:
                full = resolve_media_path(root, os.path.relpath(os.path.join(directory, name), root))
            except SkipSample as skip:
                escaped = skip.detail
                continue
            if os.path.isabs(name):
                escaped = f"absolute path {name!r}"
            elif os.path.isfile(full):
                return name, full
    if escaped:
        raise SkipSample("path_escapes_root", f"{referrer} refers to {names[0]!r}: {escaped}")
    raise SkipSample("missing_media", f"{referrer} refers to {names[0]!r}, not found")


def mesh_side_files(root: str, mesh_path: str, file_type: str, data: bytes) -> list[tuple[str, str]]:
    """The files a mesh refers to, as ``(name as written in the file, absolute path)``, in order.

    OBJ: ``mtllib`` files, then their texture maps (resolved beside the .mtl, then beside the .obj);
    glTF: external buffer and image URIs; PLY: ``comment TextureFile``. GLB/STL/OFF are self-contained.
    """
    found: dict[str, str] = {}
    mesh_dir = os.path.dirname(mesh_path)
    referrer = os.path.relpath(mesh_path, root)

    def add(names: list[str], dirs: list[str], by: str) -> str:
        name, full = _find_side_file(root, names, dirs, by)
        found.setdefault(name, full)
        return found[name]

    if file_type == "obj":
        for match in _MTLLIB.finditer(data):
            line = match.group(1).decode("utf-8", "replace")
            # one file name with spaces (what trimesh reads), else several names on one line
            mtl_names = [line] if os.path.isfile(os.path.join(mesh_dir, line)) else line.split()
            for mtl_name in mtl_names:
                mtl_full = add([mtl_name], [mesh_dir], referrer)
                mtl_ref = os.path.relpath(mtl_full, root)
                for raw in _read(mtl_full).decode("utf-8", "replace").splitlines():
                    parts = raw.strip().split(None, 1)
                    if len(parts) == 2 and parts[0].lower() in _MTL_MAPS:
                        rest = parts[1].strip()
                        # "map_Kd -s 1 1 1 tex.png": options before the name; trimesh reads the rest
                        spellings = [rest] if rest.split()[-1] == rest else [rest, rest.split()[-1]]
                        add(spellings, [os.path.dirname(mtl_full), mesh_dir], mtl_ref)
    elif file_type == "gltf":
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise SkipSample("corrupt_media", f"gltf: {_detail(err)}") from err
        entries = [doc.get(field, []) for field in ("buffers", "images")] if isinstance(doc, dict) else None
        if entries is None or not all(isinstance(e, list) for e in entries):
            raise SkipSample("corrupt_media", "gltf: not an object with 'buffers' and 'images' lists")
        for entry in [*entries[0], *entries[1]]:
            uri = entry.get("uri") if isinstance(entry, dict) else None
            if isinstance(uri, str) and not uri.startswith("data:"):
                add([urllib.parse.unquote(uri)], [mesh_dir], referrer)
    elif file_type == "ply":
        header = data[: data.find(b"end_header")] if b"end_header" in data else b""
        for raw in header.decode("ascii", "replace").splitlines():
            parts = raw.split(None, 2)
            if len(parts) == 3 and parts[0] == "comment" and parts[1].lower() == "texturefile":
                add([parts[2].strip()], [mesh_dir], referrer)
    return list(found.items())


# -- one record ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Context:
    media_root: str  # absolute and normalised
    scenario: str  # "auto" or the forced scenario
    rules: tuple[tuple[str, str], ...]
    source_file: str


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


def prepare(ctx: _Context, item: Item) -> Prepared:
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


def _paths(value: Any, field: str) -> list[str]:
    paths = _as_paths(value)
    if not all(isinstance(p, str) and p for p in paths):
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


def _prepare(ctx: _Context, item: Item, result: Prepared) -> None:
    raw = item.record
    if not isinstance(raw, dict):
        raise SkipSample("bad_record", f"record is a JSON {type(raw).__name__}, not an object")
    sample_id = raw.get("id", raw.get("sample_id"))
    result.id = str(sample_id) if sample_id is not None else f"record-{item.index}"
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
            # LLaVA's own loader does the same for records written without placeholders
            first_user = next(turn for turn in conversation if turn["role"] == "user")
            first_user["content"] = f"{IMAGE_PLACEHOLDER}\n" * len(images) + first_user["content"]
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
        [_existing(root, p, "image") for p in images]
        if images
        else [_existing(root, video or mesh, kinds[0])]
    )
    if images:
        for i, full in enumerate(fulls):
            data = _read(full)
            member = f"{i}.{check_image(data)}"
            media.append({"member": member, "type": "image", "source": os.path.relpath(full, root)})
            members.append((member, data))
    elif video:
        data = _read(fulls[0])
        check_video(data)
        media.append({"member": ext, "type": "video", "source": os.path.relpath(fulls[0], root)})
        members.append((ext, data))
    else:
        data = _read(fulls[0])
        assets: dict[str, str] = {}
        asset_bytes: dict[str, bytes] = {}
        asset_members: list[tuple[str, bytes]] = []
        for j, (name, full) in enumerate(mesh_side_files(root, fulls[0], ext, data)):
            side = _read(full)
            if full.lower().endswith(_IMAGE_FILES):
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
        raise SkipSample("bad_record", f"text is not valid Unicode: {_detail(err)}") from err
    result.record = record
    result.members = [("json", doc), *members]


# -- the conversion ------------------------------------------------------------------------------
class _RejectLog:
    """``rejected.jsonl`` in annotation order whatever order records were converted in: lines go
    to a spill file first and are copied out sorted by index when the conversion ends."""

    def __init__(self, path: Path):
        self.path, self.spill = path, path.with_name(path.name + ".part")
        self.lines: list[tuple[int, int, int]] = []  # (index, start, length) in the spill file

    def __enter__(self) -> _RejectLog:
        self.f = self.spill.open("w+b")
        return self

    def write(self, index: int, entry: dict) -> None:
        data = json_line(entry) + b"\n"
        self.lines.append((index, self.f.tell(), len(data)))
        self.f.write(data)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                with self.path.open("wb") as out:
                    for _, start, length in sorted(self.lines):
                        self.f.seek(start)
                        out.write(self.f.read(length))
        finally:
            self.f.close()
            self.spill.unlink(missing_ok=True)


def _ordered_map(fn: Callable[[Item], Prepared], items: Iterable[Item], pool: Executor | None, window: int):
    """``map(fn, items)`` in input order; with a pool, at most ``window`` records are in flight."""
    if pool is None:
        yield from map(fn, items)
        return
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def _check_name(name: str, what: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"{what} {name!r} must be letters, digits, '_' or '-' (it names a folder)")
    return name


def _previous_outputs(out: Path) -> list[Path]:
    return [
        *[p for p in (out / "report.json", out / "rejected.jsonl") if p.exists()],
        *sorted(out.glob(f"*/{SHARD_GLOB}")),
        *sorted(out.glob(f"*/{SHARD_GLOB}.part")),
        *sorted(out.glob(f"*/{INDEX_NAME}")),
    ]


def convert(
    annotations: Path | str,
    media_root: Path | str,
    out: Path | str,
    scenario: str = "auto",
    shard_size: int = 1000,
    workers: int = 1,
    dataset_rules: dict[str, str] | None = None,
    progress: bool = True,
    *,
    overwrite: bool = False,
    keep_order: bool = False,
    seed: int = 0,
) -> dict:
    """Convert an annotation file into ``OUT/<scenario>/shard-NNNNNN.tar``; returns the report.

    ``scenario="auto"`` infers each record's scenario (:func:`infer_scenario`), anything else forces
    it. ``dataset_rules`` maps a dataset-name pattern to a scenario, overriding the defaults.
    ``OUT`` must not already hold a conversion unless ``overwrite`` (then only the previous
    conversion's own files are removed). Also writes ``OUT/report.json`` and ``OUT/rejected.jsonl``.
    Records are written in an order shuffled with ``seed`` unless ``keep_order``.
    """
    annotations, media_root, out = Path(annotations), Path(media_root), Path(out)
    if not annotations.is_file():
        raise FileNotFoundError(f"annotation file {annotations} not found")
    if not media_root.is_dir():
        raise NotADirectoryError(f"media root {media_root} is not a directory")
    if scenario != AUTO:
        _check_name(scenario, "scenario")
    for pattern, target in (dataset_rules or {}).items():
        if not pattern:
            raise ValueError("empty dataset rule pattern")
        _check_name(target, f"scenario of rule {pattern!r}")
    if shard_size < 1 or workers < 1:
        raise ValueError(f"shard_size and workers must be >= 1 (got {shard_size}, {workers})")

    out.mkdir(parents=True, exist_ok=True)
    previous = _previous_outputs(out)
    if previous and not overwrite:
        raise FileExistsError(
            f"{out} already holds a conversion ({previous[0].name}, ...); use an empty folder or overwrite"
        )
    for path in previous:
        path.unlink()

    ctx = _Context(
        media_root=os.path.normpath(os.path.abspath(media_root)),
        scenario=scenario,
        rules=ordered_rules(dataset_rules),
        source_file=annotations.name,
    )
    report, keys = ConvertReport(), KeyAllocator()
    writers: dict[str, ShardWriter] = {}
    try:
        with contextlib.ExitStack() as stack:
            pool = None
            if workers > 1:
                pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers))
                # start (fork) the workers now, before rich starts its refresh thread
                pool.submit(int).result()
            bar = stack.enter_context(_progress_bar(progress))
            task = bar.add_task(
                "convert", total=annotations.stat().st_size, name=annotations.name, ok=0, bad=0
            )
            rejected = stack.enter_context(_RejectLog(out / "rejected.jsonl"))
            records = (
                iter_annotations(annotations)
                if keep_order
                else shuffled_annotations(annotations, out / ".records.part", seed)
            )
            results = _ordered_map(partial(prepare, ctx), records, pool, window=4 * workers)
            for res in results:
                if res.reason:
                    report.add_skipped(res.scenario, res.reason)
                    entry = {
                        "index": res.index,
                        "id": res.id,
                        "scenario": res.scenario or UNKNOWN_SCENARIO,
                        "reason": res.reason,
                        "detail": res.detail,
                        "record": res.raw,
                    }
                    rejected.write(res.index, entry)
                else:
                    assert res.scenario is not None and res.id is not None
                    writer = writers.get(res.scenario)
                    if writer is None:
                        writer = writers[res.scenario] = ShardWriter(out / res.scenario, shard_size)
                    writer.write(keys(res.id), res.members)
                    report.add_written(res.scenario, res.fixes)
                bar.update(
                    task,
                    completed=res.offset,
                    ok=sum(report.written.values()),
                    bad=sum(report.skipped.values()),
                )
            bar.update(task, completed=annotations.stat().st_size)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    shards = {
        name: [p.relative_to(out).as_posix() for p in writers[name].close()] for name in sorted(writers)
    }
    doc = report.as_dict(
        shards=shards,
        options={
            "annotations": annotations.name,
            "scenario": scenario,
            "shard_size": shard_size,
            "order": "annotations" if keep_order else f"shuffled (seed {seed})",
            "rules": {k.lower(): v for k, v in (dataset_rules or {}).items()},
        },
    )
    tmp = out / "report.json.part"
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / "report.json")
    return doc


def _progress_bar(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("converting {task.fields[name]}"),
        BarColumn(),
        DownloadColumn(),
        TextColumn("[green]{task.fields[ok]} written[/] [red]{task.fields[bad]} rejected[/]"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


# -- command line --------------------------------------------------------------------------------
def parse_rule(text: str) -> tuple[str, str]:
    pattern, sep, scenario = text.partition("=")
    if not sep or not pattern.strip() or not scenario.strip():
        raise argparse.ArgumentTypeError(f"rule {text!r} is not DATASET=SCENARIO")
    return pattern.strip(), scenario.strip()


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``mmscene data convert``."""
    parser.add_argument(
        "annotations",
        metavar="ANNOTATIONS",
        type=Path,
        help="LLaVA / M4-Instruct annotations: a .json array or .jsonl",
    )
    parser.add_argument(
        "--media-root", type=Path, required=True, help="folder the image / video / mesh paths are relative to"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder: OUT/<scenario>/shard-*.tar")
    parser.add_argument(
        "--scenario", default=AUTO, help="'auto' (infer per record) or a scenario name forced on every record"
    )
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--workers", type=int, default=1, help="processes that validate and read media")
    parser.add_argument(
        "--rule",
        action="append",
        type=parse_rule,
        default=[],
        metavar="DATASET=SCENARIO",
        help="records whose dataset / id / image path contains DATASET (any case) go to "
        "SCENARIO; repeatable, overrides the built-in 3D rules",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a previous conversion in OUT")
    parser.add_argument(
        "--keep-order",
        action="store_true",
        help="write records in annotation order (default: a seeded shuffle across shards)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the record shuffle (default 0)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def convert_main(args: argparse.Namespace) -> int:
    """Run the conversion from parsed arguments: 0 ok, 1 nothing usable, 2 bad input or options."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    rules = {}
    for rule in getattr(args, "rule", None) or []:
        pattern, scenario = parse_rule(rule) if isinstance(rule, str) else rule
        rules[pattern] = scenario
    try:
        report = convert(
            args.annotations,
            args.media_root,
            args.out,
            scenario=getattr(args, "scenario", AUTO),
            shard_size=getattr(args, "shard_size", 1000),
            workers=getattr(args, "workers", 1),
            dataset_rules=rules,
            progress=getattr(args, "progress", True),
            overwrite=getattr(args, "overwrite", False),
            keep_order=getattr(args, "keep_order", False),
            seed=getattr(args, "seed", 0),
        )
    except (OSError, ValueError) as err:
        console.print(f"[red]error:[/] {err}")
        return 2
    table = Table(title=f"{report['total']} records -> {args.out}")
    table.add_column("scenario")
    table.add_column("written", justify="right")
    table.add_column("rejected", justify="right")
    for name in sorted(set(report["written"]) | set(report["skipped_by_scenario"])):
        bad = sum(report["skipped_by_scenario"].get(name, {}).values())
        table.add_row(name, str(report["written"].get(name, 0)), str(bad))
    console.print(table)
    if report["skipped"]:
        reasons = ", ".join(f"{reason} {n}" for reason, n in report["skipped"].items())
        console.print(f"rejected: {reasons} (see {Path(args.out) / 'rejected.jsonl'})")
    fixed = {k: v for k, v in report["fixed"].items() if v}
    if fixed:
        console.print("fixed: " + ", ".join(f"{k} {v}" for k, v in fixed.items()))
    if report["total"] and not report["written"]:
        console.print("[red]no record could be converted[/]")
        return 1
    return 0
