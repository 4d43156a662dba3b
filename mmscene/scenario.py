"""The scenario plugin contract: the bottom floor that the data plumbing and every plugin import.

A scenario plugin is a :class:`Scenario` subclass registered under the ``mmscene.scenarios``
entry point group. It contributes three things:

1. ``load(sample)``: a raw WebDataset sample (``{"__key__": str, "json": bytes, "<ext>": bytes}``)
   → an :class:`Example` with decoded media; raise :class:`SkipSample` for bad samples.
2. ``format(example, rng)``: an :class:`Example` → a :class:`Prompt`, the interleaved
   conversation where every ``<image>`` stands for one entry of ``images``, in order.
3. ``metrics(task, question_type)``: torchmetrics objects that score generated answers.

The constructor takes keyword options only, so configs can set them
(``scenarios: {video: {num_frames: 8}}``).
"""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Any, ClassVar

from PIL import Image

from mmscene.constants import IMAGE_PLACEHOLDER, ROLES
from mmscene.schema import validate_record
from mmscene.skips import SkipSample

__all__ = ["IMAGE_PLACEHOLDER", "ROLES", "Example", "Prompt", "Scenario", "SkipSample"]

VARIANT_SEEDS = 8  # formats tried by the default ``prompt_variants``


@dataclasses.dataclass
class Example:
    """A decoded sample, before any prompt decisions.

    conversation: ``[{"role": "user"|"assistant"|"system", "content": str}]``; user turns may hold
        ``<image>`` placeholders as written in the record.
    images: decoded still images (single image, multi-image set, or 3D views).
    frames: decoded video frames (already sampled), with ``frame_times`` in seconds.
    record: the sample's ``KEY.json`` document (see :mod:`mmscene.schema`).
    """

    key: str
    scenario: str
    task: str
    conversation: list[dict[str, str]]
    images: list[Image.Image] = dataclasses.field(default_factory=list)
    frames: list[Image.Image] = dataclasses.field(default_factory=list)
    frame_times: list[float] = dataclasses.field(default_factory=list)
    question_type: str = "open-ended"
    record: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Prompt:
    """What the tokenizer and the model see.

    images[i] fills the i-th ``<image>`` of the conversation; pooled[i] marks video frames whose
    patch grid the model may pool; anyres[i] (empty: none) marks images cut into AnyRes crops
    where the model has grid pinpoints (single images, LLaVA-NeXT). ``answer`` is the reference
    of the last assistant turn, used by generation-based validation.
    """

    key: str
    scenario: str
    task: str
    conversation: list[dict[str, str]]
    images: list[Image.Image]
    pooled: list[bool]
    question_type: str = "open-ended"
    answer: str = ""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    anyres: list[bool] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        n = sum(turn["content"].count(IMAGE_PLACEHOLDER) for turn in self.conversation)
        if n != len(self.images):
            raise SkipSample(
                "placeholder_mismatch", f"{n} <image> placeholders for {len(self.images)} images"
            )
        if len(self.pooled) != len(self.images):
            raise ValueError(f"pooled has {len(self.pooled)} flags for {len(self.images)} images")
        if self.anyres and len(self.anyres) != len(self.images):
            raise ValueError(f"anyres has {len(self.anyres)} flags for {len(self.images)} images")


class Scenario:
    """Base class of scenario plugins. Subclasses set ``name`` and implement ``load``/``format``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def load(self, sample: dict[str, Any]) -> Example:
        raise NotImplementedError

    def format(self, example: Example, rng: random.Random) -> Prompt:
        raise NotImplementedError

    def prompt_variants(self, example: Example) -> list[Prompt]:
        """Every prompt ``format`` can make of ``example``, for the pre-tokenized shard form
        (``mmscene data tokenize``). The default formats it with a few seeds and keeps the distinct
        conversations; a plugin whose draws give more texts than that finds lists them here.
        A prompt missing from the list is still trained on, tokenized in the loop."""
        seen: dict[str, Prompt] = {}
        for seed in range(VARIANT_SEEDS):
            prompt = self.format(example, random.Random(seed))
            seen.setdefault(json.dumps(prompt.conversation, sort_keys=True), prompt)
        return list(seen.values())

    def metrics(self, task: str, question_type: str) -> dict[str, Any]:
        """Default scoring: option accuracy for multiple choice, ROUGE-L F1 for open answers."""
        from mmscene.metrics import default_metrics

        return default_metrics(question_type)

    def options(self) -> dict[str, Any]:
        """The constructor options this instance was built with (shown by ``mmscene plugins``)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    # -- helpers plugins share -------------------------------------------------------------
    @staticmethod
    def read_record(sample: dict[str, Any]) -> dict[str, Any]:
        """The sample's ``KEY.json`` document, validated against the shard schema."""
        raw = sample.get("json")
        if raw is None:
            raise SkipSample("missing_json", f"sample {sample.get('__key__')} has no .json member")
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise SkipSample("bad_json", str(err)) from err
        validate_record(record)
        return record

    def example(self, sample: dict[str, Any], record: dict[str, Any], **media: Any) -> Example:
        """An :class:`Example` of this scenario from a validated record and its decoded media."""
        return Example(
            key=sample.get("__key__", record["id"]),
            scenario=self.name,
            task=record["task"],
            conversation=[{"role": t["role"], "content": t["content"]} for t in record["conversations"]],
            question_type=record["question_type"],
            record=record,
            **media,
        )

    def prompt(
        self,
        example: Example,
        conversation: list[dict[str, str]],
        images: list[Image.Image],
        pooled: list[bool],
        meta: dict[str, Any] | None = None,
        anyres: list[bool] | None = None,
    ) -> Prompt:
        """A :class:`Prompt` of this scenario; the answer is the conversation's last assistant turn."""
        return Prompt(
            key=example.key,
            scenario=self.name,
            task=example.task,
            conversation=conversation,
            images=list(images),
            pooled=pooled,
            question_type=example.question_type,
            answer=self.answer_of(conversation),
            meta=meta or {},
            anyres=list(anyres or []),
        )

    @staticmethod
    def answer_of(conversation: list[dict[str, str]]) -> str:
        for turn in reversed(conversation):
            if turn["role"] == "assistant":
                return turn["content"]
        return ""
