"""The pictures, clips and meshes of the demo dataset: flat colours and simple solids that survive
resizing, chroma subsampling and a 48-pixel tower, drawn reproducibly from a seeded ``Random``."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Far apart in hue and each far from the light background, so they survive resizing and video
# chroma subsampling.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 195, 25),
}
BACKGROUND = (250, 250, 250)
# The shapes the odd image stands out from: a tiny model spots "the coloured one" in minutes,
# while comparing arbitrary colour pairs across images takes it far longer.
NEUTRAL = ("grey", (120, 120, 120))
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
SOLIDS = ("cube", "sphere", "cylinder", "cone")


def draw_shape(
    shape: str, colour: tuple[int, int, int], px: int, rng: random.Random, centred: bool = False
) -> Image.Image:
    """A filled shape of 45-70% of the image side at a random place, fully inside the frame.

    ``centred``: 65-80% of the side, centred up to ``px // 16`` pixels off (the shape task: a
    tiny tower from scratch tells shapes apart at a fixed place within minutes, while at any
    place it stayed at chance for thousands of steps).
    """
    img = Image.new("RGB", (px, px), BACKGROUND)
    draw = ImageDraw.Draw(img)
    margin = max(1, px // 32)
    if centred:
        size = round(rng.uniform(0.65, 0.8) * px)
        room = min(px // 16, (px - size) // 2 - margin)
        x0 = (px - size) // 2 + rng.randint(-room, room)
        y0 = (px - size) // 2 + rng.randint(-room, room)
    else:
        size = round(rng.uniform(0.45, 0.7) * px)
        x0 = rng.randint(margin, px - size - margin)
        y0 = rng.randint(margin, px - size - margin)
    x1, y1 = x0 + size - 1, y0 + size - 1
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return img


def motion_frames(
    direction: str, colour: tuple[int, int, int], px: int, num_frames: int, rng: random.Random
) -> list[np.ndarray]:
    """A square (a quarter of the side) moving at constant speed over 70-100% of the free track."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}")
    size = px // 4
    margin = max(1, px // 32)
    free = px - size - 2 * margin
    travel = rng.uniform(0.7, 1.0) * free
    start = margin + rng.uniform(0, free - travel)
    across = rng.randint(margin, px - size - margin)
    frames = []
    for t in range(num_frames):
        along = start + travel * t / (num_frames - 1)
        if direction in ("left", "up"):
            along = px - size - along  # mirror of the right/down track
        x, y = (round(along), across) if direction in ("left", "right") else (across, round(along))
        frame = np.empty((px, px, 3), np.uint8)
        frame[:] = BACKGROUND
        frame[y : y + size, x : x + size] = colour
        frames.append(frame)
    return frames


def write_mp4(frames: Sequence[np.ndarray], path: Path, fps: int) -> None:
    """MPEG-4 part 2, yuv420p, one GOP, no B-frames: few KB, and decord reads every frame back."""
    import av

    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = frames[0].shape[1]
        stream.height = frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = len(frames)
        # B-frames reorder timestamps; without them decode order = display order.
        stream.codec_context.max_b_frames = 0
        stream.codec_context.thread_count = 1  # same bytes on every machine
        stream.options = {"qscale": "3"}  # near-lossless for flat colours at a few KB
        container.metadata["encoder"] = "mmscene-demo"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def solid_mesh(kind: str, colour: tuple[int, int, int], rng: random.Random):
    """A unit-sized solid with one vertex colour, +Y up (glTF), randomly turned about +Y."""
    import trimesh

    if kind == "cube":
        mesh = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    elif kind == "sphere":
        mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.6)
    elif kind == "cylinder":
        mesh = trimesh.creation.cylinder(radius=0.5, height=1.1, sections=24)
    elif kind == "cone":
        mesh = trimesh.creation.cone(radius=0.6, height=1.1, sections=24)
    else:
        raise ValueError(f"unknown solid {kind!r}")
    mesh.apply_translation(-mesh.bounds.mean(axis=0))
    # trimesh builds cylinders and cones along +Z; glTF's up is +Y.
    mesh.apply_transform(trimesh.transformations.rotation_matrix(-math.pi / 2, (1, 0, 0)))
    mesh.apply_transform(trimesh.transformations.rotation_matrix(rng.uniform(0, 2 * math.pi), (0, 1, 0)))
    mesh.apply_scale(rng.uniform(0.85, 1.15))
    rgba = np.array([*colour, 255], np.uint8)
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=np.tile(rgba, (len(mesh.vertices), 1)))
    return mesh
