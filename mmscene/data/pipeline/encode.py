"""Prompt → model tensors: chat template, tokenization, image-token expansion, loss mask, pixels.

The chat template comes from the tokenizer when it has one, else the qwen_1_5 ChatML template.
Assistant spans are found by rendering growing prefixes of the conversation, which works for
any template that renders a prefix as a prefix (no ``{% generation %}`` markers needed).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch

from mmscene.constants import IGNORE_INDEX
from mmscene.data.media.preprocess import MEAN, STD, normalisation, preprocess_images
from mmscene.data.pipeline.chat_template import DEFAULT_SYSTEM_PROMPT, QWEN_1_5_TEMPLATE, with_system_prompt
from mmscene.scenario import IMAGE_PLACEHOLDER, Prompt, SkipSample


@dataclasses.dataclass
class ImageGeometry:
    """What the model needs from the data side: image size and positions per image."""

    image_size: int
    image_token_id: int
    tokens_per_image: int
    tokens_per_pooled_image: int
    pad_to_square: bool = True
    image_mean: tuple[float, ...] = MEAN  # the tower's normalisation (mmscene.data.media.preprocess)
    image_std: tuple[float, ...] = STD

    @classmethod
    def of(cls, model, pad_to_square: bool = True) -> ImageGeometry:
        return cls(
            image_size=model.image_size,
            image_token_id=model.config.image_token_id,
            tokens_per_image=model.tokens_per_image(),
            tokens_per_pooled_image=model.tokens_per_image(pooled=True),
            pad_to_square=pad_to_square,
            **normalisation(model.config.vision_config.model_type),
        )


class PromptEncoder:
    def __init__(
        self,
        tokenizer: Any,
        geometry: ImageGeometry,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        max_length: int | None = None,
        overflow: Literal["trim", "skip"] = "trim",
    ):
        if overflow not in ("trim", "skip"):
            raise ValueError(f"overflow must be 'trim' or 'skip', got {overflow!r}")
        self.tokenizer = tokenizer
        self.geometry = geometry
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.overflow = overflow
        self.template = getattr(tokenizer, "chat_template", None) or QWEN_1_5_TEMPLATE

    # ------------------------------------------------------------------ public
    def encode(self, prompt: Prompt) -> dict[str, Any]:
        """Training tensors: every assistant turn is a target, everything else is masked."""
        turns = self._turn_tokens(self._messages(prompt.conversation), prompt)
        turns = self._fit(turns, prompt)
        return self._assemble(turns, prompt)

    def encode_for_generation(self, prompt: Prompt) -> dict[str, Any]:
        """The conversation up to the last assistant turn, ending in the generation prompt."""
        conv = list(prompt.conversation)
        if conv and conv[-1]["role"] == "assistant":
            conv = conv[:-1]
        messages = self._messages(conv)
        text = self._render(messages, add_generation_prompt=True)
        n_images = text.count(IMAGE_PLACEHOLDER)
        ids = self._tokens(text, prompt.pooled[:n_images])
        if self.max_length is not None and len(ids) > self.max_length:
            raise SkipSample(
                "too_long", f"{prompt.key}: prompt of {len(ids)} tokens > max_length {self.max_length}"
            )
        out = self._pixels(prompt, n_images)
        out["input_ids"] = torch.tensor(ids, dtype=torch.long)
        return out

    # ------------------------------------------------------------------ pieces
    def _messages(self, conversation: list[dict[str, str]]) -> list[dict[str, str]]:
        return with_system_prompt(conversation, self.system_prompt)

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        if not messages:
            return ""
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _turn_tokens(self, messages: list[dict[str, str]], prompt: Prompt) -> list[dict[str, Any]]:
        """Per message: token ids, labels and how many images it holds."""
        turns = []
        prev = ""
        image_index = 0
        for i, msg in enumerate(messages):
            if msg["role"] == "assistant":
                if IMAGE_PLACEHOLDER in msg["content"]:
                    raise SkipSample(
                        "image_in_answer", f"{prompt.key}: assistant turn holds an <image> placeholder"
                    )
                head = self._render(messages[:i], add_generation_prompt=True)
                full = self._render(messages[: i + 1])
                self._check_prefix(prev, head, prompt)
                self._check_prefix(head, full, prompt)
                body = full[len(head) :]
                target = body.rstrip()  # content + end-of-turn marker; the trailing newline is context
                pieces = [(head[len(prev) :], False), (target, True), (body[len(target) :], False)]
            else:
                full = self._render(messages[: i + 1])
                self._check_prefix(prev, full, prompt)
                pieces = [(full[len(prev) :], False)]
            ids: list[int] = []
            labels: list[int] = []
            n_images = 0
            for text, is_target in pieces:
                n = text.count(IMAGE_PLACEHOLDER)
                piece = self._tokens(text, prompt.pooled[image_index : image_index + n])
                ids += piece
                labels += piece if is_target else [IGNORE_INDEX] * len(piece)
                image_index += n
                n_images += n
            turns.append({"role": msg["role"], "ids": ids, "labels": labels, "images": n_images})
            prev = full
        if image_index != len(prompt.images):
            raise SkipSample(
                "placeholder_mismatch",
                f"{prompt.key}: {image_index} placeholders for {len(prompt.images)} images",
            )
        return turns

    @staticmethod
    def _check_prefix(prefix: str, text: str, prompt: Prompt) -> None:
        if not text.startswith(prefix):
            raise ValueError(
                f"chat template does not render conversation prefixes as prefixes (sample {prompt.key}); "
                "mmscene cannot locate assistant turns with it: set a different chat template"
            )

    def _tokens(self, text: str, pooled: list[bool]) -> list[int]:
        parts = text.split(IMAGE_PLACEHOLDER)
        ids: list[int] = []
        g = self.geometry
        for j, part in enumerate(parts):
            if part:
                ids += self.tokenizer(part, add_special_tokens=False)["input_ids"]
            if j < len(parts) - 1:
                n = g.tokens_per_pooled_image if pooled[j] else g.tokens_per_image
                ids += [g.image_token_id] * n
        return ids

    def _fit(self, turns: list[dict[str, Any]], prompt: Prompt) -> list[dict[str, Any]]:
        """Apply the length policy; never cut through an image or a turn."""
        limit = self.max_length
        total = sum(len(t["ids"]) for t in turns)
        if limit is None or total <= limit:
            return turns
        if self.overflow == "skip":
            raise SkipSample("too_long", f"{prompt.key}: {total} tokens > max_length {limit}")
        kept = list(turns)
        # Drop whole trailing exchanges, keeping at least one assistant turn.
        while sum(len(t["ids"]) for t in kept) > limit:
            last_user = max((i for i, t in enumerate(kept) if t["role"] == "user"), default=0)
            remaining = kept[:last_user]
            if not any(t["role"] == "assistant" for t in remaining):
                raise SkipSample("too_long", f"{prompt.key}: first exchange alone exceeds max_length {limit}")
            kept = remaining
        return kept

    def _pixels(self, prompt: Prompt, n_images: int) -> dict[str, Any]:
        g = self.geometry
        images = prompt.images[:n_images]
        return {
            "pixel_values": preprocess_images(
                images, g.image_size, g.pad_to_square, g.image_mean, g.image_std
            ),
            "image_pooling": torch.tensor(prompt.pooled[:n_images], dtype=torch.bool),
        }

    def _assemble(self, turns: list[dict[str, Any]], prompt: Prompt) -> dict[str, Any]:
        ids = [i for t in turns for i in t["ids"]]
        labels = [i for t in turns for i in t["labels"]]
        n_images = sum(t["images"] for t in turns)
        out = self._pixels(prompt, n_images)
        out["input_ids"] = torch.tensor(ids, dtype=torch.long)
        out["labels"] = torch.tensor(labels, dtype=torch.long)
        return out
