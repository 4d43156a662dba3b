"""``multi_image``: a set of images, shown interleaved with the text or all in front of it."""

from __future__ import annotations

import random
from typing import Any

from mmscene.data.media import decode_image
from mmscene.scenario import Example, Prompt, Scenario, SkipSample
from mmscene_plugins import (
    count_placeholders,
    image_block,
    media_bytes,
    media_items,
    move_placeholders_front,
    prepend_to_first_user_turn,
)

PLACEMENTS = ("interleaved", "front", "mixed")


class MultiImageScenario(Scenario):
    """N images, the i-th ``<image>`` of the conversation showing the i-th image.

    Options:
        placement: ``"interleaved"`` keeps every placeholder where the record puts it;
            ``"front"`` moves all of them, in order, to the start of the first user turn;
            ``"mixed"`` picks per sample: front with probability ``front_prob``, else interleaved
            (the paper's mixed-format training, so that both formats work at inference).
            A record without placeholders always gets its images in front.
        front_prob: probability of the front format under ``placement="mixed"``.
        max_pixels: decompression-bomb limit per image.
    """

    name = "multi_image"
    description = "several images, interleaved with the text or in front of it"

    def __init__(
        self, *, placement: str = "interleaved", front_prob: float = 0.5, max_pixels: int | None = None
    ):
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if not 0.0 <= front_prob <= 1.0:
            raise ValueError(f"front_prob must be in [0, 1], got {front_prob}")
        self.placement = placement
        self.front_prob = float(front_prob)
        self.max_pixels = max_pixels

    def load(self, sample: dict[str, Any]) -> Example:
        record = self.read_record(sample)
        items = media_items(record, self.name, ("image",))
        if not items:
            raise SkipSample("wrong_media", f"{record['id']}: multi_image record lists no images")
        images = [decode_image(media_bytes(sample, m["member"]), max_pixels=self.max_pixels) for m in items]
        return self.example(sample, record, images=images)

    def format(self, example: Example, rng: random.Random) -> Prompt:
        mixed_front = self.placement == "mixed" and rng.random() < self.front_prob
        return self._placed(example, self.placement == "front" or mixed_front)

    def prompt_variants(self, example: Example) -> list[Prompt]:
        """Both placements under ``mixed``, else the one."""
        fronts = (True, False) if self.placement == "mixed" else (self.placement == "front",)
        return [self._placed(example, front) for front in fronts]

    def _placed(self, example: Example, front: bool) -> Prompt:
        conversation = [dict(t) for t in example.conversation]
        n = count_placeholders(conversation)
        if n not in (0, len(example.images)):
            # checked before moving: "front" would otherwise paper over a defect that
            # "interleaved" skips, so the same record would train in one format only
            raise SkipSample(
                "placeholder_mismatch", f"{n} <image> placeholders for {len(example.images)} images"
            )
        front = front or n == 0
        if front and n:
            conversation = move_placeholders_front(conversation)
        elif front:
            conversation = prepend_to_first_user_turn(conversation, image_block([""] * len(example.images)))
        return self.prompt(
            example,
            conversation,
            example.images,
            [False] * len(example.images),
            {"placement": "front" if front else "interleaved"},
        )
