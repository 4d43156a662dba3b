"""``video``: one clip, shown as sampled frames, each its own ``<image>``."""

from __future__ import annotations

import random
from typing import Any

from mmscene.data.media import decode_video
from mmscene.scenario import Example, Prompt, Scenario, SkipSample
from mmscene_plugins import expand_placeholder, media_bytes, media_items

FRAME_LABELS = ("none", "index", "time")


class VideoScenario(Scenario):
    """A video as N frames: the record's one ``<image>`` (or none: front of the first user turn)
    becomes one ``<image>`` per frame, one per line. Frames are marked ``pooled`` so the model may
    pool their patch grid.

    Options:
        num_frames: frames sampled uniformly over the whole clip (centre of N equal segments; a
            shorter clip gives each of its frames once).
        fps: when set, sample one frame per ``1/fps`` seconds instead, at most ``max_frames``
            (thinned evenly when the clip is longer).
        max_frames: cap on the frame count (both modes).
        frame_labels: ``"none"``; ``"index"`` prefixes each frame with ``"Frame i: "`` (from 1);
            ``"time"`` with its timestamp, ``"t=1.5s: "``.
        frame_size: when set (the tower's image size), frames are decoded with their longer side
            scaled down to it, never up: padding to a square and resizing then give the tower the
            same geometry, but the decoder converts, and the preprocessing resizes, small frames.
    """

    name = "video"
    description = "a video as uniformly or fps-sampled frames"

    def __init__(
        self,
        *,
        num_frames: int = 16,
        fps: float | None = None,
        max_frames: int = 32,
        frame_labels: str = "none",
        frame_size: int | None = None,
    ):
        if num_frames < 1 or max_frames < 1:
            raise ValueError("num_frames and max_frames must be at least 1")
        if fps is not None and fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if frame_labels not in FRAME_LABELS:
            raise ValueError(f"frame_labels must be one of {FRAME_LABELS}, got {frame_labels!r}")
        if frame_size is not None and frame_size < 1:
            raise ValueError(f"frame_size must be at least 1, got {frame_size}")
        self.num_frames = int(num_frames)
        self.fps = None if fps is None else float(fps)
        self.max_frames = int(max_frames)
        self.frame_labels = frame_labels
        self.frame_size = None if frame_size is None else int(frame_size)

    def load(self, sample: dict[str, Any]) -> Example:
        record = self.read_record(sample)
        items = media_items(record, self.name, ("video",))
        if len(items) != 1:
            raise SkipSample("wrong_media", f"{record['id']}: video needs one video, record has {len(items)}")
        frames, times = decode_video(
            media_bytes(sample, items[0]["member"]),
            self.num_frames,
            self.fps,
            max_frames=self.max_frames,
            max_side=self.frame_size,
        )
        # decord's float32 seconds: 0.31999 -> 0.32
        return self.example(sample, record, frames=frames, frame_times=[round(t, 3) for t in times])

    def labels(self, times: list[float]) -> list[str]:
        if self.frame_labels == "index":
            return [f"Frame {i + 1}: " for i in range(len(times))]
        if self.frame_labels == "time":
            return [f"t={t:.1f}s: " for t in times]
        return [""] * len(times)

    def format(self, example: Example, rng: random.Random) -> Prompt:
        conversation = [dict(t) for t in example.conversation]
        conversation = expand_placeholder(conversation, self.labels(example.frame_times), what="video")
        return self.prompt(
            example,
            conversation,
            example.frames,
            [True] * len(example.frames),
            {"frame_times": list(example.frame_times)},
        )
