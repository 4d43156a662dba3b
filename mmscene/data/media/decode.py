"""Safe decoders for the media bytes of shard samples, shared by the scenario plugins.

Every decoder reads from memory (shard members are bytes; nothing touches the filesystem) and turns
any failure into :class:`~mmscene.scenario.SkipSample` with a stable reason:

- ``corrupt_media``: unreadable, truncated or empty image / video / mesh bytes;
- ``bomb``: an image whose header claims more pixels than :data:`MAX_IMAGE_PIXELS`.

Decoding untrusted bytes can raise almost anything from the codec libraries (PIL alone raises
OSError, SyntaxError, ValueError, struct.error, ...), so the decoders catch broadly and re-raise
as a skip, keeping the library's message as the detail.
"""

from __future__ import annotations

import io
import logging
import posixpath
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageFile

from mmscene.scenario import SkipSample

log = logging.getLogger(__name__)

# Same default as PIL (~ a 9500x9500 photo). Our own check runs on the header before any pixel is
# decoded; PIL's own DecompressionBombError (2x its global) is mapped to the same reason.
MAX_IMAGE_PIXELS = 89_478_485
# Video frames are held decoded in memory: cap the sampled frames' total pixels (~ 64 1080p frames).
MAX_VIDEO_PIXELS = 64 * 1920 * 1080

MESH_TYPES = ("glb", "gltf", "obj", "ply", "stl", "off")


def _detail(err: BaseException, limit: int = 200) -> str:
    # decord puts the whole input buffer into its message; keep reports readable.
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= limit else text[:limit] + "..."


# -- images ----------------------------------------------------------------------------------
def decode_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode image bytes into a fully loaded RGB image.

    Transparent images are composited over white (a black background would change the content the
    annotator saw). Animated formats give their first frame.
    """
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone flipped PIL's global: truncated files would decode as grey bands, silently.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; mmscene needs it False")
    if not data:
        raise SkipSample("empty_media", "empty image bytes")
    try:
        with warnings.catch_warnings():
            # our own pixel limit decides; PIL's warning between 1x and 2x its limit is noise here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        width, height = img.size
        if width * height > limit:
            raise SkipSample("bomb", f"image claims {width}x{height} pixels (limit {limit})")
        img.load()  # decode now: truncation only shows up here
        return _to_rgb(img)
    except SkipSample:
        raise
    except Image.DecompressionBombError as err:
        raise SkipSample("bomb", _detail(err)) from err
    except Exception as err:  # noqa: BLE001 - any codec failure means unusable bytes
        raise SkipSample("corrupt_media", _detail(err)) from err


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit / 32-bit grey: PIL's convert clips instead of scaling, giving a white image
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max()
        arr = arr / hi * 255.0 if hi > 0 else arr
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


# -- video -----------------------------------------------------------------------------------
def uniform_indices(total: int, num: int) -> list[int]:
    """``num`` frame indices spread evenly over ``total``: the centre of each of ``num`` equal segments.

    Never more indices than frames, so a short clip gives each frame once rather than duplicates.
    """
    if total <= 0 or num <= 0:
        return []
    num = min(num, total)
    return [int((i + 0.5) * total / num) for i in range(num)]


def fps_indices(total: int, video_fps: float, fps: float, max_frames: int | None) -> list[int]:
    """One frame every ``1/fps`` seconds (centred in each interval), thinned evenly to ``max_frames``."""
    if total <= 0 or video_fps <= 0 or fps <= 0:
        return []
    duration = total / video_fps
    count = max(1, int(duration * fps))
    indices = sorted({min(total - 1, int((k + 0.5) / fps * video_fps)) for k in range(count)})
    if max_frames is not None and len(indices) > max_frames:
        indices = [indices[i] for i in uniform_indices(len(indices), max_frames)]
    return indices


def decode_video(
    data: bytes,
    num_frames: int | None,
    fps: float | None,
    *,
    max_frames: int | None = None,
    max_side: int | None = None,
) -> tuple[list[Image.Image], list[float]]:
    """Decode sampled frames of a video held in memory.

    Sampling is by ``fps`` when given (one frame per ``1/fps`` s, at most ``max_frames``), else
    ``num_frames`` uniformly over the whole clip. Only the sampled frames are decoded. With
    ``max_side``, frames whose longer side exceeds it are scaled down by the decoder (aspect kept,
    never up): a tower of that size pads and resizes them to the same geometry at a fraction of
    the cost. Returns the frames and their presentation times in seconds.
    """
    if fps is None and not num_frames:
        raise ValueError("decode_video needs num_frames or fps")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be at least 1, got {max_side}")
    if not data:
        raise SkipSample("empty_media", "empty video bytes")
    import decord  # imported here: only video plugins pay its start-up

    def open_reader(width: int = -1, height: int = -1):
        return decord.VideoReader(
            io.BytesIO(data), ctx=decord.cpu(0), width=width, height=height, num_threads=1
        )

    try:
        reader = open_reader()
        total = len(reader)
        if fps is not None:
            indices = fps_indices(total, float(reader.get_avg_fps()), fps, max_frames)
        else:
            indices = uniform_indices(
                total, num_frames if max_frames is None else min(num_frames, max_frames)
            )
        if not indices:
            raise SkipSample("no_frames", "video has no frames")
        # one frame first: its size bounds the batch before the batch is decoded
        height, width = reader.next().shape[:2]
        batch = None
        scaled = _scaled(width, height, max_side)
        if scaled is not None and len(indices) * scaled[0] * scaled[1] <= MAX_VIDEO_PIXELS:
            # decord scales only when opened with the output size. The full-size reader goes first:
            # after next() its decoder thread runs ahead, burning a core beside the scaled one.
            del reader
            reader, batch = _scaled_batch(open_reader, indices, *scaled)
        if batch is None:
            if reader is None:  # the scaled decode failed: the full-size one decides
                reader = open_reader()
            if len(indices) * height * width > MAX_VIDEO_PIXELS:
                raise SkipSample(
                    "bomb", f"{len(indices)} frames of {width}x{height} (limit {MAX_VIDEO_PIXELS})"
                )
            batch = reader.get_batch(indices).asnumpy()
        times = [float(t) for t in reader.get_frame_timestamp(indices)[:, 0]]
    except SkipSample:
        raise
    except Exception as err:  # noqa: BLE001 - decord raises RuntimeError/DECORDError on bad streams
        raise SkipSample("corrupt_media", _detail(err)) from err
    if batch.ndim != 4 or batch.shape[0] != len(indices) or batch.shape[-1] != 3:
        raise SkipSample("corrupt_media", f"decoder returned frames of shape {batch.shape}")
    if batch.shape[0] * batch.shape[1] * batch.shape[2] > MAX_VIDEO_PIXELS:
        raise SkipSample("bomb", f"{batch.shape[0]} frames of {batch.shape[2]}x{batch.shape[1]}")
    return [Image.fromarray(frame) for frame in batch], times


def _scaled_batch(open_reader, indices: list[int], width: int, height: int) -> tuple[Any, np.ndarray | None]:
    """A reader and the frames decoded at ``width x height``, or ``(None, None)`` where decord
    fails to: it garbles a few sizes (48x27 of a 16:9 clip), and on a broken stream the
    full-size decode then reports the same error as without scaling."""
    try:
        reader = open_reader(width, height)
        batch = reader.get_batch(indices).asnumpy()
    except Exception:  # noqa: BLE001 - whatever went wrong, the full-size path decides
        return None, None
    if batch.shape != (len(indices), height, width, 3):
        return None, None
    return reader, batch


def _scaled(width: int, height: int, max_side: int | None) -> tuple[int, int] | None:
    """``(width, height)`` with the longer side ``max_side``, or None where no downscale is due."""
    if max_side is None or max(width, height) <= max_side:
        return None
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


# -- meshes ----------------------------------------------------------------------------------
def _mesh_resolver(assets: dict[str, bytes]) -> Any:
    """A trimesh resolver serving a mesh's side files (.mtl, textures, .bin) from memory only."""
    from trimesh.resolvers import Resolver

    class MemoryResolver(Resolver):
        def __init__(self, files: dict[str, bytes]):
            self.files = dict(files)
            # meshes refer to side files as "./tex.png", "textures\\Tex.PNG", ...: match leniently
            self._by_base = {posixpath.basename(k.replace("\\", "/")).lower(): k for k in self.files}

        def get(self, name: str) -> bytes:
            if isinstance(name, bytes):
                name = name.decode("utf-8", "replace")
            if name in self.files:
                return self.files[name]
            norm = posixpath.normpath(name.replace("\\", "/")).lstrip("/")
            if norm in self.files:
                return self.files[norm]
            base = posixpath.basename(norm).lower()
            if base in self._by_base:
                return self.files[self._by_base[base]]
            raise KeyError(f"mesh asset {name!r} not in sample (have {sorted(self.files)})")

        def write(self, name: str, data: Any) -> None:
            raise PermissionError("mesh resolver is read-only")

        def namespaced(self, namespace: str) -> MemoryResolver:
            prefix = namespace.strip("/") + "/"
            return MemoryResolver(
                {k[len(prefix) :]: v for k, v in self.files.items() if k.startswith(prefix)}
            )

        def keys(self):
            return self.files.keys()

    return MemoryResolver(assets)


def load_mesh(data: bytes, file_type: str, assets: dict[str, bytes] | None = None) -> Any:
    """Load a mesh or point cloud (``trimesh.Trimesh`` / ``PointCloud`` / ``Scene``) from bytes.

    ``assets`` maps the file names the mesh refers to (``model.mtl``, ``albedo.png``) to their bytes;
    a missing side file leaves the mesh uncoloured rather than failing (trimesh logs it).
    """
    import trimesh

    file_type = file_type.lower().lstrip(".")
    if file_type not in MESH_TYPES:
        raise SkipSample("corrupt_media", f"unsupported mesh type {file_type!r} (known: {MESH_TYPES})")
    if not data:
        raise SkipSample("empty_media", "empty mesh bytes")
    try:
        geometry = trimesh.load(
            io.BytesIO(data), file_type=file_type, resolver=_mesh_resolver(assets or {}), allow_remote=False
        )
    except Exception as err:  # noqa: BLE001 - trimesh's parsers raise whatever their input provokes
        raise SkipSample("corrupt_media", _detail(err)) from err
    if _vertex_count(geometry) == 0:
        # garbage text parses as an empty OBJ/scene instead of failing
        raise SkipSample("no_geometry", f"{file_type} holds no geometry")
    _check_faces(geometry)
    _load_textures(geometry)
    return geometry


def _check_faces(geometry: Any) -> None:
    """Faces must refer to vertices that exist: trimesh loads a glb whose indices point past the
    vertex buffer, and the renderer would then index out of bounds."""
    import trimesh

    parts = geometry.geometry.values() if isinstance(geometry, trimesh.Scene) else [geometry]
    for part in parts:
        faces = getattr(part, "faces", None)
        if faces is None or not len(faces):
            continue
        faces, n = np.asarray(faces), len(part.vertices)
        if faces.min() < 0 or faces.max() >= n:
            raise SkipSample("corrupt_media", f"faces refer to vertex {int(faces.max())}, mesh has {n}")


def _load_textures(geometry: Any) -> None:
    """Decode the textures now, under the image limits: trimesh opens them lazily, so a bomb or a
    truncated texture would otherwise only blow up (OSError, memory) when the mesh is rendered."""
    import trimesh

    parts = geometry.geometry.values() if isinstance(geometry, trimesh.Scene) else [geometry]
    for part in parts:
        material = getattr(getattr(part, "visual", None), "material", None)
        if material is None:
            continue
        values = list(vars(material).values())
        values += [v for d in values if isinstance(d, dict) for v in d.values()]  # PBRMaterial._data
        for image in values:
            if not isinstance(image, Image.Image):
                continue
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise SkipSample("bomb", f"texture claims {width}x{height} pixels (limit {MAX_IMAGE_PIXELS})")
            try:
                image.load()
            except Exception as err:  # noqa: BLE001 - any codec failure means an unusable texture
                raise SkipSample("corrupt_media", f"texture: {_detail(err)}") from err


def _vertex_count(geometry: Any) -> int:
    import trimesh

    if isinstance(geometry, trimesh.Scene):
        return sum(_vertex_count(g) for g in geometry.geometry.values())
    vertices = getattr(geometry, "vertices", None)
    if vertices is None or not np.all(np.isfinite(vertices)):
        return 0
    return len(vertices)
