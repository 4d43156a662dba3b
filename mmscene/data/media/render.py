"""A small CPU renderer: meshes and point clouds → K views around the object, as PIL images.

No display, OpenGL or GPU: a numpy z-buffer rasterizer. Good enough to give a vision encoder
multi-view pictures of a 3D asset, not a photoreal renderer.

- Triangles are rasterised with edge functions, all pixel candidates of a chunk of faces at once
  (no Python loop per face); depth and colours are interpolated perspective-correctly.
- Colours: texture lookup per pixel when the mesh has UVs and a texture image; otherwise the
  per-vertex or per-face colours trimesh gives (``visual.to_color()`` for textures without UVs or
  image, which yields the material's diffuse colour); a neutral grey when there are none.
- Shading: two-sided Lambert with a light beside the camera plus ambient (meshes); points are
  splatted as small squares with a depth cue, since point clouds carry no normals.
- Cameras: on a circle at a fixed elevation, looking at the centre of the object's bounding box;
  the object is first scaled into the unit sphere so every view frames it whole.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

# Colour of meshes / points that carry none: light enough that shading stays visible.
from mmscene.data.media.raster import DEFAULT_COLOR, Mesh, Points, concat_meshes, render_one


def camera_distance(fov_deg: float) -> float:
    """Distance from the origin at which the unit sphere just fits a view cone of ``fov_deg``."""
    return 1.02 / math.sin(math.radians(fov_deg) / 2)


def orbit_poses(
    num_views: int,
    elevation_deg: float = 30.0,
    distance: float = 3.0,
    *,
    up: str = "y",
    azimuth_offset_deg: float = 0.0,
) -> list[np.ndarray]:
    """Camera-to-world 4x4 matrices (OpenGL convention: camera looks down its -Z, +Y is up) of
    ``num_views`` cameras evenly spaced in azimuth around the origin, looking at it."""
    if up not in ("y", "z"):
        raise ValueError(f"up must be 'y' or 'z', got {up!r}")
    el = math.radians(elevation_deg)
    world_up = np.array([0.0, 1.0, 0.0]) if up == "y" else np.array([0.0, 0.0, 1.0])
    poses = []
    for k in range(num_views):
        az = math.radians(azimuth_offset_deg + 360.0 * k / num_views)
        if up == "y":  # az=0 looks from +Z, the glTF "front"
            eye = distance * np.array(
                [math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)]
            )
        else:  # az=0 looks from -Y, the Blender / scan "front"
            eye = distance * np.array(
                [math.cos(el) * math.sin(az), -math.cos(el) * math.cos(az), math.sin(el)]
            )
        forward = -eye / np.linalg.norm(eye)
        right = np.cross(forward, world_up)
        if np.linalg.norm(right) < 1e-8:  # looking straight down the up axis
            right = np.cross(forward, np.roll(world_up, 1))
        right /= np.linalg.norm(right)
        cam_up = np.cross(right, forward)
        pose = np.eye(4)
        pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, cam_up, -forward, eye
        poses.append(pose)
    return poses


def render_views(
    geometry: Any,
    num_views: int = 8,
    size: int = 384,
    elevation_deg: float = 30.0,
    *,
    fov_deg: float = 40.0,
    up: str = "y",
    azimuth_offset_deg: float = 0.0,
    background: tuple[int, int, int] = (255, 255, 255),
    point_radius: int | None = None,
    supersample: int = 1,
    return_poses: bool = False,
) -> list[Image.Image] | tuple[list[Image.Image], list[np.ndarray]]:
    """Render ``num_views`` RGB images of ``size``x``size`` pixels of a trimesh ``Trimesh``,
    ``PointCloud`` or ``Scene``.

    The object is centred on its bounding box and scaled into the unit sphere; the camera distance
    is chosen so that the sphere fills the field of view. ``supersample`` renders at that factor
    and box-filters down (anti-aliasing, ``supersample**2`` times the work). Points are drawn as
    squares of half-width ``point_radius`` pixels (default: from the point count). With
    ``return_poses`` also returns the camera-to-world matrices in that normalised frame.
    """
    if num_views < 1 or size < 1 or supersample < 1:
        raise ValueError("num_views, size and supersample must be positive")
    meshes, points = _flatten(geometry)
    if not meshes and not points:
        raise ValueError("nothing to render: geometry has no faces or points")
    center, scale = _normaliser(meshes, points)
    for part in [*meshes, *points]:
        part.vertices = (part.vertices - center) * scale

    half_fov = math.radians(fov_deg) / 2
    distance = camera_distance(fov_deg)
    poses = orbit_poses(num_views, elevation_deg, distance, up=up, azimuth_offset_deg=azimuth_offset_deg)
    px = size * supersample
    focal = (px / 2) / math.tan(half_fov)
    radius = point_radius
    if radius is None and points:
        # squares just large enough that the visible half of the points tiles the silhouette
        n = sum(len(p.vertices) for p in points)
        side = 1.5 * px * math.sqrt(math.pi / (2 * max(n, 1)))
        radius = max(0, math.ceil((side - 1) / 2))
    elif radius is not None:
        radius = radius * supersample

    merged = concat_meshes(meshes) if meshes else None
    images = []
    for pose in poses:
        rgb = render_one(merged, points, pose, focal, px, background, radius or 0)
        img = Image.fromarray(rgb, "RGB")
        if supersample > 1:
            img = img.reduce(supersample)
        images.append(img)
    return (images, poses) if return_poses else images


# -- geometry preparation --------------------------------------------------------------------
def _flatten(geometry: Any) -> tuple[list[Mesh], list[Points]]:
    import trimesh

    if isinstance(geometry, trimesh.Scene):
        parts = geometry.dump(concatenate=False)  # copies with scene transforms applied
    elif isinstance(geometry, list | tuple):
        parts = list(geometry)
    else:
        parts = [geometry]
    meshes, points = [], []
    for part in parts:
        if isinstance(part, trimesh.Trimesh) and len(part.faces):
            meshes.append(_mesh_part(part))
        elif isinstance(part, trimesh.PointCloud) and len(part.vertices):
            points.append(_points_part(part))
        elif isinstance(part, trimesh.Trimesh) and len(part.vertices):
            # a PLY of vertices only loads as a face-less Trimesh: it is a point cloud
            colors = None
            if part.visual.kind == "vertex":
                colors = part.visual.vertex_colors
            points.append(_points_part(trimesh.PointCloud(part.vertices, colors=colors)))
    return meshes, points


def _mesh_part(mesh: Any) -> Mesh:
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    visual = mesh.visual
    kind = visual.kind
    if kind == "texture":
        uv = getattr(visual, "uv", None)
        material = visual.material
        if hasattr(material, "to_simple"):  # PBR (glTF): base colour texture
            material = material.to_simple()
        image = getattr(material, "image", None)
        if uv is not None and len(uv) == len(vertices) and image is not None:
            tex = np.asarray(image.convert("RGB"), dtype=np.uint8)
            neutral = np.full((len(faces), 3, 3), 255.0, dtype=np.float32)
            return Mesh(vertices, faces, neutral, np.asarray(uv, dtype=np.float64)[faces], tex)
        # no UVs or no image: the material's diffuse colour, as trimesh resolves it
        visual = visual.to_color()
        kind = visual.kind
    if kind == "vertex":
        colors = np.asarray(visual.vertex_colors, dtype=np.float32)[:, :3]
        corner = colors[faces]
    elif kind == "face":
        colors = np.asarray(visual.face_colors, dtype=np.float32)[:, :3]
        corner = np.repeat(colors[:, None, :], 3, axis=1)
    else:
        corner = np.broadcast_to(np.asarray(DEFAULT_COLOR, dtype=np.float32), (len(faces), 3, 3))
    return Mesh(vertices, faces, np.ascontiguousarray(corner))


def _points_part(cloud: Any) -> Points:
    vertices = np.asarray(cloud.vertices, dtype=np.float64)
    colors = np.asarray(cloud.colors) if cloud.colors is not None else np.zeros((0, 4))
    if len(colors) == len(vertices):
        colors = colors[:, :3].astype(np.float32)
    else:
        colors = np.broadcast_to(np.asarray(DEFAULT_COLOR, dtype=np.float32), (len(vertices), 3))
    return Points(vertices, colors)


def _normaliser(meshes: list[Mesh], points: list[Points]) -> tuple[np.ndarray, float]:
    # only vertices that faces use: unreferenced vertices (common in OBJ exports) must not shift framing
    used = [m.vertices[np.unique(m.faces)] for m in meshes] + [p.vertices for p in points]
    allv = np.concatenate(used)
    allv = allv[np.all(np.isfinite(allv), axis=1)]
    center = (allv.min(axis=0) + allv.max(axis=0)) / 2
    radius = float(np.linalg.norm(allv - center, axis=1).max())
    return center, (1.0 / radius if radius > 0 else 1.0)
