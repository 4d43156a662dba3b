"""The rasteriser behind :mod:`.render`: a numpy z-buffer for triangles (edge functions over
chunks of faces, perspective-correct interpolation, texture lookup, Lambert shading) and point
splats. Geometry arrives already flattened and normalised into the unit sphere.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Colour of meshes / points that carry none: light enough that shading stays visible.
DEFAULT_COLOR = (180, 180, 180)
_AMBIENT = 0.35
# Light direction in camera coordinates (x right, y up, z forward): from above-left of the camera,
# so faces at different angles get different brightness even when they face the viewer equally.
_LIGHT = np.array([-0.35, 0.5, -1.0]) / np.linalg.norm([-0.35, 0.5, -1.0])
# Upper bound of pixel candidates processed at once (memory ~ 100 bytes each).
_CHUNK = 1 << 21


@dataclasses.dataclass
class Mesh:
    vertices: np.ndarray  # (V, 3) float64
    faces: np.ndarray  # (F, 3) int64
    corner_colors: np.ndarray  # (F, 3, 3) float32, 0..255
    corner_uv: np.ndarray | None = None  # (F, 3, 2) when textured
    texture: np.ndarray | None = None  # (H, W, 3) uint8


@dataclasses.dataclass
class Merged:
    """All mesh parts as one face list; textures stay per part (``texture_id`` per face, -1: none)."""

    vertices: np.ndarray
    faces: np.ndarray
    corner_colors: np.ndarray
    corner_uv: np.ndarray
    texture_id: np.ndarray
    textures: list[np.ndarray | None]
    normals: np.ndarray  # (F, 3) unit face normals


@dataclasses.dataclass
class Points:
    vertices: np.ndarray  # (N, 3)
    colors: np.ndarray  # (N, 3) float32


# -- rasterisation ---------------------------------------------------------------------------
def _to_camera(vertices: np.ndarray, pose: np.ndarray, focal: float, px: int) -> tuple[np.ndarray, ...]:
    """Pixel coordinates (x right, y down) and depth along the view direction."""
    rel = vertices - pose[:3, 3]
    x = rel @ pose[:3, 0]
    y = rel @ pose[:3, 1]
    z = -(rel @ pose[:3, 2])  # camera looks down -Z: positive depth in front
    z = np.maximum(z, 1e-6)
    return px / 2 + focal * x / z, px / 2 - focal * y / z, z


def render_one(
    mesh: Merged | None,
    points: list[Points],
    pose: np.ndarray,
    focal: float,
    px: int,
    background: tuple[int, int, int],
    radius: int,
) -> np.ndarray:
    n_pix = px * px
    zbuf = np.full(n_pix, np.inf)
    face_buf = np.full(n_pix, -1, dtype=np.int64)
    b0_buf = np.zeros(n_pix)
    b1_buf = np.zeros(n_pix)
    point_buf = np.full(n_pix, -1, dtype=np.int64)

    if mesh is not None:
        sx, sy, z = _to_camera(mesh.vertices, pose, focal, px)
        _raster_triangles(sx, sy, z, mesh.faces, px, zbuf, face_buf, b0_buf, b1_buf)
    if points:
        pv = np.concatenate([p.vertices for p in points])
        pc = np.concatenate([p.colors for p in points])
        sx_p, sy_p, z_p = _to_camera(pv, pose, focal, px)
        _splat_points(sx_p, sy_p, z_p, radius, px, zbuf, face_buf, point_buf)

    out = np.empty((n_pix, 3), dtype=np.float32)
    out[:] = np.asarray(background, dtype=np.float32)
    hit = np.flatnonzero(face_buf >= 0)
    if len(hit):
        out[hit] = _shade_faces(mesh, z, pose, face_buf[hit], b0_buf[hit], b1_buf[hit])
    hit_p = np.flatnonzero(point_buf >= 0)
    if len(hit_p):
        ids = point_buf[hit_p]
        depth = z_p[ids]
        lo, hi = z_p.min(), z_p.max()
        cue = 1.0 - 0.45 * (depth - lo) / max(hi - lo, 1e-9)  # nearer points brighter
        out[hit_p] = pc[ids] * cue[:, None].astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8).reshape(px, px, 3)


def concat_meshes(meshes: list[Mesh]) -> Merged:
    offsets = np.cumsum([0] + [len(m.vertices) for m in meshes[:-1]])
    vertices = np.concatenate([m.vertices for m in meshes])
    faces = np.concatenate([m.faces + o for m, o in zip(meshes, offsets)])
    tri = vertices[faces]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    return Merged(
        vertices=vertices,
        faces=faces,
        corner_colors=np.concatenate([m.corner_colors for m in meshes]),
        corner_uv=np.concatenate(
            [m.corner_uv if m.corner_uv is not None else np.zeros((len(m.faces), 3, 2)) for m in meshes]
        ),
        texture_id=np.concatenate(
            [np.full(len(m.faces), i if m.texture is not None else -1) for i, m in enumerate(meshes)]
        ),
        textures=[m.texture for m in meshes],
        normals=normals,
    )


def _raster_triangles(
    sx: np.ndarray,
    sy: np.ndarray,
    z: np.ndarray,
    faces: np.ndarray,
    px: int,
    zbuf: np.ndarray,
    face_buf: np.ndarray,
    b0_buf: np.ndarray,
    b1_buf: np.ndarray,
) -> None:
    """Scan-convert all faces at once: per (face, pixel row) the exact span of covered pixel
    centres, then every covered pixel as one candidate; the z-buffer keeps the nearest."""
    X, Y = sx[faces], sy[faces]  # (F, 3)
    inv_z = 1.0 / z[faces]
    area = (X[:, 1] - X[:, 0]) * (Y[:, 2] - Y[:, 0]) - (X[:, 2] - X[:, 0]) * (Y[:, 1] - Y[:, 0])
    # pixel centres are at +0.5
    x0 = np.maximum(np.ceil(X.min(axis=1) - 0.5), 0)
    x1 = np.minimum(np.floor(X.max(axis=1) - 0.5), px - 1)
    y0 = np.maximum(np.ceil(Y.min(axis=1) - 0.5), 0).astype(np.int64)
    y1 = np.minimum(np.floor(Y.max(axis=1) - 0.5), px - 1).astype(np.int64)
    keep = np.flatnonzero((np.abs(area) > 1e-12) & (x1 >= x0) & (y1 >= y0))
    if not len(keep):
        return
    X, Y, area, inv_z, x0, x1, y0 = X[keep], Y[keep], area[keep], inv_z[keep], x0[keep], x1[keep], y0[keep]
    heights = y1[keep] - y0 + 1

    # barycentric weight of corner i is linear in the pixel position: A*x + B*y + C
    def coefficients(j: int, k: int) -> np.ndarray:
        ux, uy = X[:, k] - X[:, j], Y[:, k] - Y[:, j]
        return np.stack([-uy, ux, uy * X[:, j] - ux * Y[:, j]], axis=1) / area[:, None]

    k0, k1 = coefficients(1, 2), coefficients(2, 0)
    k2 = np.array([0.0, 0.0, 1.0]) - k0 - k1

    # one entry per (face, row): the weights restricted to the row are a*x + c
    rf = np.repeat(np.arange(len(keep)), heights)
    ry = y0[rf] + np.arange(len(rf)) - np.repeat(np.cumsum(heights) - heights, heights)
    fy = ry + 0.5
    lo = x0[rf] - 0.5
    hi = x1[rf] + 0.5
    row_a, row_c = [], []
    with np.errstate(divide="ignore", invalid="ignore"):
        for k in (k0, k1, k2):
            a = k[rf, 0]
            c = k[rf, 1] * fy + k[rf, 2]
            t = -c / a  # where this weight crosses zero along the row
            lo = np.where(a > 0, np.maximum(lo, t), lo)
            hi = np.where(a < 0, np.minimum(hi, t), hi)
            hi = np.where((a == 0) & (c < 0), -np.inf, hi)
            row_a.append(a)
            row_c.append(c)
    tol = 1e-7  # shared edges: let both faces claim the pixel rather than neither
    xs = np.ceil(lo - 0.5 - tol)
    xe = np.floor(np.maximum(hi, lo - 1) - 0.5 + tol)
    n = np.maximum(xe - xs + 1, 0).astype(np.int64)
    xs = xs.astype(np.int64)

    # rows in chunks of bounded candidate count (a chunk holds at least one row)
    cum = np.cumsum(n)
    start = 0
    while start < len(n):
        done = cum[start - 1] if start else 0
        stop = max(int(np.searchsorted(cum, done + _CHUNK, side="right")), start + 1)
        rows = np.arange(start, stop)
        start = stop
        c = n[rows]
        if not c.sum():
            continue
        r = np.repeat(rows, c)
        cx = xs[r] + np.arange(len(r)) - np.repeat(np.cumsum(c) - c, c)
        fx = cx + 0.5
        w0 = row_a[0][r] * fx + row_c[0][r]
        w1 = row_a[1][r] * fx + row_c[1][r]
        w2 = 1.0 - w0 - w1
        fi = rf[r]
        pix = ry[r] * px + cx
        iz = inv_z[fi]
        depth = 1.0 / (w0 * iz[:, 0] + w1 * iz[:, 1] + w2 * iz[:, 2])
        np.minimum.at(zbuf, pix, depth)
        win = depth <= zbuf[pix]
        p = pix[win]
        face_buf[p] = keep[fi[win]]
        b0_buf[p] = w0[win]
        b1_buf[p] = w1[win]


def _splat_points(
    sx: np.ndarray,
    sy: np.ndarray,
    z: np.ndarray,
    radius: int,
    px: int,
    zbuf: np.ndarray,
    face_buf: np.ndarray,
    point_buf: np.ndarray,
) -> None:
    r = max(int(radius), 0)  # half-width: 0 = one pixel, 1 = 3x3, ...
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    dx, dy = dx.ravel(), dy.ravel()
    cx0 = np.floor(sx).astype(np.int64)
    cy0 = np.floor(sy).astype(np.int64)
    per = max(1, _CHUNK // len(dx))
    for s in range(0, len(sx), per):
        ids = np.arange(s, min(s + per, len(sx)))
        cx = (cx0[ids, None] + dx).ravel()
        cy = (cy0[ids, None] + dy).ravel()
        pid = np.repeat(ids, len(dx))
        ok = (cx >= 0) & (cx < px) & (cy >= 0) & (cy < px)
        pix, pid = cy[ok] * px + cx[ok], pid[ok]
        depth = z[pid]
        np.minimum.at(zbuf, pix, depth)
        win = depth <= zbuf[pix]
        point_buf[pix[win]] = pid[win]
        face_buf[pix[win]] = -1  # a nearer point hides the surface behind it


def _shade_faces(
    mesh: Merged, z: np.ndarray, pose: np.ndarray, faces: np.ndarray, b0: np.ndarray, b1: np.ndarray
) -> np.ndarray:
    # perspective-correct weights: screen barycentrics divided by depth, renormalised
    b = np.stack([b0, b1, 1.0 - b0 - b1], axis=1) / z[mesh.faces[faces]]
    b /= b.sum(axis=1, keepdims=True)
    cc = mesh.corner_colors[faces]
    color = b[:, 0:1] * cc[:, 0] + b[:, 1:2] * cc[:, 1] + b[:, 2:3] * cc[:, 2]
    tex_id = mesh.texture_id[faces]
    for t in np.unique(tex_id[tex_id >= 0]):
        sel = np.flatnonzero(tex_id == t)
        uv = np.einsum("ni,nic->nc", b[sel], mesh.corner_uv[faces[sel]])
        color[sel] = _sample_texture(mesh.textures[t], uv)

    # Lambert against a light beside the camera, two-sided (mesh winding is often inconsistent)
    light_world = pose[:3, :3] @ (_LIGHT * np.array([1.0, 1.0, -1.0]))  # camera +Z points backwards
    lambert = np.abs(mesh.normals @ light_world)[faces]
    shade = _AMBIENT + (1.0 - _AMBIENT) * lambert
    return color * shade[:, None].astype(np.float32)


def _sample_texture(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Nearest-texel lookup; UVs outside [0, 1] wrap (repeat), v=0 is the bottom row."""
    h, w = texture.shape[:2]
    u, v = uv[:, 0], uv[:, 1]
    u = np.where((u < 0) | (u > 1), np.mod(u, 1.0), u)
    v = np.where((v < 0) | (v > 1), np.mod(v, 1.0), v)
    x = np.clip((u * w).astype(np.int64), 0, w - 1)
    y = np.clip(((1.0 - v) * h).astype(np.int64), 0, h - 1)
    return texture[y, x].astype(np.float32)
