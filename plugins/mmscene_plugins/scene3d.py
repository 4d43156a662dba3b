"""``3d``: a scene or object shown as multi-view images, captured or rendered from a mesh."""

from __future__ import annotations

import random
from typing import Any

from mmscene.data.media import (
    camera_distance,
    decode_image,
    load_mesh,
    orbit_poses,
    render_views,
    uniform_indices,
)
from mmscene.scenario import IMAGE_PLACEHOLDER, Example, Prompt, Scenario, SkipSample
from mmscene_plugins import (
    count_placeholders,
    expand_placeholder,
    media_bytes,
    media_items,
)


class Scene3DScenario(Scenario):
    """A 3D scene as ``num_views`` images, given either as

    - multi-view images (record media all ``image``, optional ``record["poses"]``): when there are
      more than ``num_views``, evenly spaced ones are kept (centre of equal segments of the list);
    - one mesh or point cloud (a ``.glb``/``.gltf``/``.ply``/``.obj``/``.stl``/``.off`` member,
      side files listed in the media item's ``assets``), rendered on the CPU into ``num_views``
      views on a circle at ``elevation_deg``.

    The record's one ``<image>`` (or none: front of the first user turn) becomes one ``<image>``
    per view, labelled ``"View i: "`` with ``view_labels``. A multi-view record with one
    placeholder per image keeps those of the kept views in place instead (unlabelled).

    Options:
        num_views: views shown (kept or rendered).
        view_size: side in pixels of rendered views.
        elevation_deg: camera elevation of rendered views.
        view_labels: prefix expanded views with ``"View i: "`` (from 1).
        up_axis: ``"y"`` (glTF, most OBJ) or ``"z"`` (scans) for rendered meshes; a record's
            ``metadata.up_axis`` overrides it.
        fov_deg: field of view of rendered views.
        supersample: render at this factor and filter down (anti-aliasing; costs its square).
        max_pixels: decompression-bomb limit per view image.
    """

    name = "3d"
    description = "multi-view images of a scene, or views rendered from a mesh / point cloud"

    def __init__(
        self,
        *,
        num_views: int = 8,
        view_size: int = 384,
        elevation_deg: float = 30.0,
        view_labels: bool = True,
        up_axis: str = "y",
        fov_deg: float = 40.0,
        supersample: int = 1,
        max_pixels: int | None = None,
    ):
        if num_views < 1 or view_size < 8 or supersample < 1:
            raise ValueError("num_views >= 1, view_size >= 8 and supersample >= 1 are required")
        if up_axis not in ("y", "z"):
            raise ValueError(f"up_axis must be 'y' or 'z', got {up_axis!r}")
        if not 0.0 < fov_deg < 180.0:
            raise ValueError(f"fov_deg must be in (0, 180), got {fov_deg}")
        self.num_views = int(num_views)
        self.view_size = int(view_size)
        self.elevation_deg = float(elevation_deg)
        self.view_labels = bool(view_labels)
        self.up_axis = up_axis
        self.fov_deg = float(fov_deg)
        self.supersample = int(supersample)
        self.max_pixels = max_pixels

    # -- loading ---------------------------------------------------------------------------
    def load(self, sample: dict[str, Any]) -> Example:
        record = self.read_record(sample)
        items = media_items(record, self.name, ("image", "mesh"))
        meshes = [m for m in items if m["type"] == "mesh"]
        if meshes and len(items) != 1:
            raise SkipSample("wrong_media", f"{record['id']}: a 3d record holds one mesh and nothing else")
        if not items:
            raise SkipSample("wrong_media", f"{record['id']}: 3d record lists no media")
        if meshes:
            images = self._render(sample, record, meshes[0])
        else:
            # decode only the views that will be shown
            images = [
                decode_image(media_bytes(sample, items[i]["member"]), max_pixels=self.max_pixels)
                for i in uniform_indices(len(items), self.num_views)
            ]
        return self.example(sample, record, images=images)

    def _up(self, record: dict[str, Any]) -> str:
        metadata = record.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise SkipSample("bad_record", f"{record['id']}: metadata is not an object")
        up = metadata.get("up_axis", self.up_axis)
        if up not in ("y", "z"):
            raise SkipSample("bad_record", f"{record['id']}: metadata.up_axis {up!r} is not 'y' or 'z'")
        return up

    def _render(self, sample: dict[str, Any], record: dict[str, Any], item: dict[str, Any]) -> list:
        assets = item.get("assets") or {}
        if not isinstance(assets, dict):
            raise SkipSample("bad_record", f"{record['id']}: mesh assets must map file names to members")
        files = {name: media_bytes(sample, member) for name, member in assets.items()}
        member = item["member"]
        geometry = load_mesh(media_bytes(sample, member), member.rsplit(".", 1)[-1], files)
        try:
            return render_views(
                geometry,
                self.num_views,
                self.view_size,
                self.elevation_deg,
                fov_deg=self.fov_deg,
                up=self._up(record),
                supersample=self.supersample,
            )
        except ValueError as err:  # loadable but nothing drawable (e.g. only lines)
            raise SkipSample("corrupt_media", f"{record['id']}: {err}") from err

    # -- formatting ------------------------------------------------------------------------
    def format(self, example: Example, rng: random.Random) -> Prompt:
        record = example.record
        conversation = [dict(t) for t in example.conversation]
        items = record["media"]
        n_views = len(example.images)
        from_mesh = bool(items) and items[0]["type"] == "mesh"
        kept = list(range(n_views)) if from_mesh else uniform_indices(len(items), self.num_views)
        n = count_placeholders(conversation)
        if n > 1 and n == len(items) and not from_mesh:
            conversation = _keep_placeholders(conversation, set(kept))
        else:
            labels = [f"View {i + 1}: " if self.view_labels else "" for i in range(n_views)]
            conversation = expand_placeholder(conversation, labels, what="3d scene")
        meta: dict[str, Any] = {"source": "mesh" if from_mesh else "images", "views": kept}
        if from_mesh:
            poses = orbit_poses(
                n_views, self.elevation_deg, camera_distance(self.fov_deg), up=self._up(record)
            )
            meta["poses"] = [p.tolist() for p in poses]
        elif isinstance(record.get("poses"), list) and len(record["poses"]) == len(items):
            meta["poses"] = [record["poses"][i] for i in kept]
        return self.prompt(example, conversation, example.images, [False] * n_views, meta)

    def metrics(self, task: str, question_type: str) -> dict[str, Any]:
        """Captioning metrics (BLEU-1..4, ROUGE-L, CIDEr of the ScanQA set; no METEOR) for open answers."""
        from mmscene.metrics import caption_metrics, default_metrics

        if question_type == "open-ended":
            return caption_metrics()
        return default_metrics(question_type)


def _keep_placeholders(conversation: list[dict[str, str]], kept: set[int]) -> list[dict[str, str]]:
    """Drop the placeholders of views not kept (numbered in conversation order), leave the rest."""
    counter = 0
    out = []
    for turn in conversation:
        parts = turn["content"].split(IMAGE_PLACEHOLDER)
        text = parts[0]
        for part in parts[1:]:
            text += (IMAGE_PLACEHOLDER if counter in kept else "") + part
            counter += 1
        out.append({**turn, "content": text})
    return out
