"""``single_image``: one photo and a conversation about it."""

from __future__ import annotations

import random
from typing import Any

from mmscene.data.media import decode_image
from mmscene.scenario import IMAGE_PLACEHOLDER, Example, Prompt, Scenario, SkipSample
from mmscene_plugins import (
    count_placeholders,
    media_bytes,
    media_items,
    prepend_to_first_user_turn,
)


class SingleImageScenario(Scenario):
    """One image; the record's ``<image>`` stays where it stands (none: ``<image>\\n`` in front of
    the first user turn, the LLaVA convention).

    Options:
        max_pixels: decompression-bomb limit in pixels (default :data:`mmscene.data.media.decode.MAX_IMAGE_PIXELS`).
        anyres: cut the image into AnyRes crops (LLaVA-NeXT; the model needs
            ``image_grid_pinpoints``); multi-image sets, video and 3D keep one crop per image.
    """

    name = "single_image"
    description = "one image, placeholder kept where the record puts it"

    def __init__(self, *, max_pixels: int | None = None, anyres: bool = False):
        self.max_pixels = max_pixels
        self.anyres = bool(anyres)

    def load(self, sample: dict[str, Any]) -> Example:
        record = self.read_record(sample)
        items = media_items(record, self.name, ("image",))
        if len(items) != 1:
            raise SkipSample(
                "wrong_media", f"{record['id']}: single_image needs one image, record has {len(items)}"
            )
        image = decode_image(media_bytes(sample, items[0]["member"]), max_pixels=self.max_pixels)
        return self.example(sample, record, images=[image])

    def format(self, example: Example, rng: random.Random) -> Prompt:
        conversation = [dict(t) for t in example.conversation]
        if count_placeholders(conversation) == 0:
            conversation = prepend_to_first_user_turn(conversation, IMAGE_PLACEHOLDER)
        # a count other than one makes Prompt skip the sample
        n = len(example.images)
        return self.prompt(example, conversation, example.images, [False] * n, anyres=[self.anyres] * n)
