"""A record's media files: found under the media root (never outside it) and checked to decode.

Runs in the converter's worker processes. A check reads the whole file, as the loaders will, so a
record whose media would be skipped at training time is rejected here with the same reason.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any

from PIL import Image, ImageFile

from mmscene.data.media.decode import MAX_IMAGE_PIXELS
from mmscene.scenario import SkipSample

# The same limit the loaders apply (mmscene.data.media.decode), so nothing converted is refused later.
BOMB_PIXELS = MAX_IMAGE_PIXELS
MESH_TYPES = ("obj", "glb", "gltf", "ply", "stl", "off")
# Member suffix from the decoded format, not the file name: a PNG saved as .jpg is stored as .png.
_IMAGE_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "TIFF": "tiff", "JPEG2000": "jp2", "WEBP": "webp"}
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
IMAGE_FILES = (".png", ".jpg", ".jpeg", ".bmp", ".tga", ".tif", ".tiff", ".webp", ".gif")


# -- media checks (run in the workers) ---------------------------------------------------------
def error_detail(err: BaseException, limit: int = 200) -> str:
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
            raise SkipSample("corrupt_media", error_detail(err)) from err
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
        raise SkipSample("corrupt_media", error_detail(err)) from err


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
        raise SkipSample("corrupt_media", error_detail(err)) from err
    vertices = [getattr(g, "vertices", None) for g in scene.geometry.values()]
    if not any(v is not None and len(v) and np.isfinite(v).all() for v in vertices):
        # garbage text parses as an empty OBJ scene instead of failing
        raise SkipSample("corrupt_media", f"{file_type} file holds no geometry")


# -- paths under the media root -------------------------------------------------------------
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


def existing_file(root: str, rel: str, what: str) -> str:
    full = resolve_media_path(root, rel)
    if not os.path.isfile(full):
        raise SkipSample("missing_media", f"{what} {rel!r} not found")
    return full


def read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise SkipSample("missing_media", error_detail(err)) from err


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
                for raw in read_file(mtl_full).decode("utf-8", "replace").splitlines():
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
            raise SkipSample("corrupt_media", f"gltf: {error_detail(err)}") from err
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
