"""The four built-in scenario plugins of mmscene.

They register under the ``mmscene.scenarios`` entry point group exactly as a third-party package
would, and use only mmscene's public modules (:mod:`mmscene.scenario`, :mod:`mmscene.data.media.decode`,
:mod:`mmscene.data.media.render`, :mod:`mmscene.metrics`):

=================  ===========================================  ==================================
scenario name      class                                        media
=================  ===========================================  ==================================
``single_image``   :class:`~.single_image.SingleImageScenario`  one image
``multi_image``    :class:`~.multi_image.MultiImageScenario`    N images, interleaved / in front
``video``          :class:`~.video.VideoScenario`               one video → sampled frames
``3d``             :class:`~.scene3d.Scene3DScenario`           multi-view images, or a mesh /
                                                                point cloud rendered to views
=================  ===========================================  ==================================

This module holds the conversation helpers the plugins share; it imports none of them, so that
loading one plugin through its entry point does not import the others (and their decoders).
"""

from __future__ import annotations

import re
from typing import Any

from mmscene.constants import front_images
from mmscene.scenario import IMAGE_PLACEHOLDER, SkipSample

__all__ = [
    "IMAGE_PLACEHOLDER",
    "count_placeholders",
    "expand_placeholder",
    "first_user_turn",
    "front_images",
    "image_block",
    "media_bytes",
    "media_items",
    "move_placeholders_front",
    "prepend_to_first_user_turn",
]


def media_bytes(sample: dict[str, Any], member: str) -> bytes:
    """The bytes of shard member ``KEY.<member>``; a listed but absent member skips the sample."""
    if not isinstance(member, str):
        raise SkipSample(
            "bad_record", f"sample {sample.get('__key__')!r}: member name {member!r} is not a string"
        )
    data = sample.get(member)
    if data is None:
        raise SkipSample("missing_member", f"sample {sample.get('__key__')!r} has no member {member!r}")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SkipSample("missing_member", f"member {member!r} was pre-decoded to {type(data).__name__}")
    return bytes(data)


def media_items(record: dict[str, Any], scenario: str, allowed: tuple[str, ...]) -> list[dict[str, Any]]:
    """The record's media list, refusing media types this scenario cannot show."""
    items = record["media"]
    wrong = sorted({m["type"] for m in items} - set(allowed))
    if wrong:
        raise SkipSample(
            "wrong_media", f"{record['id']}: scenario {scenario} cannot use media of type {wrong}"
        )
    return items


def count_placeholders(conversation: list[dict[str, str]]) -> int:
    return sum(turn["content"].count(IMAGE_PLACEHOLDER) for turn in conversation)


def first_user_turn(conversation: list[dict[str, str]]) -> int:
    for i, turn in enumerate(conversation):
        if turn["role"] == "user":
            return i
    raise SkipSample("bad_record", "conversation has no user turn to hold the images")


def image_block(labels: list[str]) -> str:
    """One ``<image>`` per label, each behind its label, one per line; with no labels at all the
    placeholders are joined by spaces (``<image> <image>``), the form lmms-eval's LLaVA models put
    in front of a question without placeholders, so harness prompts equal training's."""
    if not any(labels):
        return front_images(len(labels))
    return "\n".join(f"{label}{IMAGE_PLACEHOLDER}" for label in labels)


def prepend_to_first_user_turn(conversation: list[dict[str, str]], block: str) -> list[dict[str, str]]:
    i = first_user_turn(conversation)
    text = conversation[i]["content"]
    conversation[i] = {**conversation[i], "content": f"{block}\n{text}" if text else block}
    return conversation


def _strip_placeholders(text: str) -> str:
    text = text.replace(IMAGE_PLACEHOLDER, "")
    text = re.sub(r"[ \t]+\n", "\n", text)  # "Image 1: <image>\n" leaves "Image 1:\n", not "Image 1: \n"
    text = re.sub(r"[ \t]{2,}", " ", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def move_placeholders_front(conversation: list[dict[str, str]]) -> list[dict[str, str]]:
    """The paper's "in the front" format: every placeholder of every turn, in order, moves to the
    start of the first user turn, one per line, before any text."""
    n = count_placeholders(conversation)
    stripped = [
        {**t, "content": _strip_placeholders(t["content"])} if IMAGE_PLACEHOLDER in t["content"] else t
        for t in conversation
    ]
    return prepend_to_first_user_turn(stripped, image_block([""] * n)) if n else stripped


def expand_placeholder(
    conversation: list[dict[str, str]], labels: list[str], *, what: str
) -> list[dict[str, str]]:
    """Replace the record's single placeholder (which stands for all frames / views) by one labelled
    ``<image>`` per entry of ``labels``; with no placeholder the block goes in front of the first
    user turn. More than one placeholder is a record defect: skip rather than guess."""
    block = image_block(labels)
    n = count_placeholders(conversation)
    if n == 0:
        return prepend_to_first_user_turn(conversation, block)
    if n > 1:
        raise SkipSample("placeholder_mismatch", f"{n} <image> placeholders for one {what}")
    for i, turn in enumerate(conversation):
        if IMAGE_PLACEHOLDER in turn["content"]:
            conversation[i] = {**turn, "content": turn["content"].replace(IMAGE_PLACEHOLDER, block, 1)}
    return conversation
