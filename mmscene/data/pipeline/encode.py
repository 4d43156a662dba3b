"""Prompt → model tensors: chat template, tokenization, image-token expansion, loss mask, pixels.

The chat template comes from the tokenizer when it has one, else the qwen_1_5 ChatML template.
Assistant spans are found by rendering growing prefixes of the conversation, which works for
any template that renders a prefix as a prefix (no ``{% generation %}`` markers needed). That
costs two renders per assistant turn, so it runs once per sequence of roles on sentinel contents
(``turn_layout``); each sample is then assembled from that layout and checked with one render,
the prefix renders running again only where the check fails.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from pathlib import Path
from typing import Any, Literal

import torch

from mmscene.constants import IGNORE_INDEX
from mmscene.data.media import anyres
from mmscene.data.media.preprocess import MEAN, STD, normalisation, preprocess_images, to_rgb
from mmscene.data.pipeline import pretokenized, turn_layout
from mmscene.data.pipeline.chat_template import DEFAULT_SYSTEM_PROMPT, QWEN_1_5_TEMPLATE, with_system_prompt
from mmscene.data.pipeline.turn_layout import Pieces
from mmscene.scenario import IMAGE_PLACEHOLDER, Prompt, SkipSample

MAX_LAYOUTS = 1024  # learned turn layouts kept per encoder, one per sequence of roles

log = logging.getLogger(__name__)


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
    grid_pinpoints: list[list[int]] | None = None  # AnyRes (mmscene.data.media.anyres)
    patch_grid: int = 0  # patches per crop side
    anyres_rounding: str = "transformers"

    @classmethod
    def of(cls, model, pad_to_square: bool = True) -> ImageGeometry:
        return cls(
            image_size=model.image_size,
            image_token_id=model.config.image_token_id,
            tokens_per_image=model.tokens_per_image(),
            tokens_per_pooled_image=model.tokens_per_image(pooled=True),
            pad_to_square=pad_to_square,
            **normalisation(model.config.vision_config.model_type),
            grid_pinpoints=model.config.image_grid_pinpoints,
            patch_grid=model.patch_grid,
            anyres_rounding=model.config.anyres_rounding,
        )

    def anyres_size(self, prompt: Prompt, i: int) -> tuple[int, int] | None:
        """The ``(height, width)`` of image ``i`` when it is cut into AnyRes crops, else None."""
        if not self.grid_pinpoints or not (prompt.anyres and prompt.anyres[i]):
            return None
        width, height = prompt.images[i].size
        return height, width

    def positions(self, prompt: Prompt, i: int) -> int:
        """LLM positions of image ``i`` of ``prompt``."""
        size = self.anyres_size(prompt, i)
        if size is not None:
            return anyres.num_positions(
                size, self.grid_pinpoints, self.image_size, self.patch_grid, self.anyres_rounding
            )
        return self.tokens_per_pooled_image if prompt.pooled[i] else self.tokens_per_image


_OUTCOMES = {
    "miss": "holds no such conversation (plugin options changed since `mmscene data tokenize`?)",
    "stale": "was made with another tokenizer or chat template",
    "bad": "is unreadable or does not fit the prompt's images",
}


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
        self._layouts: dict[tuple[str, tuple[str, ...]], turn_layout.Layout | None] = {}
        self._fingerprint: str | None = None
        # outcomes of pre-tokenized members: hit, miss, stale, bad (mmscene.data.pipeline.pretokenized)
        self.stored_counts: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------------ public
    def encode(self, prompt: Prompt, stored: bytes | None = None) -> dict[str, Any]:
        """Training tensors: every assistant turn is a target, everything else is masked.

        ``stored``: the sample's pre-tokenized member; where it holds this prompt made with this
        tokenizer, its ids are used instead of rendering and tokenizing."""
        messages = self._messages(prompt.conversation)
        turns = self._stored_turns(stored, messages, prompt) if stored is not None else None
        from_store = turns is not None
        if turns is None:
            turns = self._turn_tokens(messages, prompt)
        out = self._assemble(self._fit(turns, prompt), prompt)
        out["pretokenized"] = from_store
        return out

    @property
    def fingerprint(self) -> str:
        """The tokenizer and chat template's fingerprint, as pre-tokenized members name it."""
        if self._fingerprint is None:
            self._fingerprint = pretokenized.tokenizer_fingerprint(self.tokenizer, self.template)
        return self._fingerprint

    def stored_form(self, prompt: Prompt) -> tuple[str, list[pretokenized.StoredTurn]]:
        """The messages key and per-message ``(ids, target span)`` of ``prompt``, each image one
        :data:`~mmscene.data.pipeline.pretokenized.IMAGE_MARK`: what ``mmscene data tokenize`` stores."""
        messages = self._messages(prompt.conversation)
        turns = self._turn_tokens(messages, prompt, expand_images=False)
        return pretokenized.messages_key(messages), [(t["ids"], t["target"]) for t in turns]

    def encode_for_generation(self, prompt: Prompt, stored: bytes | None = None) -> dict[str, Any]:
        """The conversation up to the last assistant turn, ending in the generation prompt
        (rendered here: a pre-tokenized member holds training's whole conversations)."""
        conv = list(prompt.conversation)
        if conv and conv[-1]["role"] == "assistant":
            conv = conv[:-1]
        messages = self._messages(conv)
        text = self._render(messages, add_generation_prompt=True)
        n_images = text.count(IMAGE_PLACEHOLDER)
        ids = self._tokens(text, prompt, 0)
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

    def _turn_tokens(
        self, messages: list[dict[str, str]], prompt: Prompt, expand_images: bool = True
    ) -> list[dict[str, Any]]:
        """Per message: token ids, labels, the target's span and how many images it holds."""
        pieces = self._layout_pieces(messages)
        if pieces is None:
            pieces = self._prefix_pieces(messages, prompt.key)
        turns = []
        image_index = 0
        for msg, (head, target, tail) in zip(messages, pieces, strict=True):
            ids: list[int] = []
            labels: list[int] = []
            n_images = 0
            span = (0, 0)
            for text, is_target in ((head, False), (target, True), (tail, False)):
                n = text.count(IMAGE_PLACEHOLDER)
                piece = self._tokens(text, prompt, image_index, expand_images)
                if is_target:
                    span = (len(ids), len(ids) + len(piece))
                ids += piece
                labels += piece if is_target else [IGNORE_INDEX] * len(piece)
                image_index += n
                n_images += n
            turns.append(
                {"role": msg["role"], "ids": ids, "labels": labels, "images": n_images, "target": span}
            )
        if image_index != len(prompt.images):
            raise SkipSample(
                "placeholder_mismatch",
                f"{prompt.key}: {image_index} placeholders for {len(prompt.images)} images",
            )
        return turns

    def _stored_turns(
        self, stored: bytes, messages: list[dict[str, str]], prompt: Prompt
    ) -> list[dict[str, Any]] | None:
        """``_turn_tokens``' result from a pre-tokenized member, or None where it does not hold it."""
        found, outcome = pretokenized.lookup(stored, self.fingerprint, messages)
        turns: list[dict[str, Any]] = []
        if found is not None:
            g, image = self.geometry, 0
            for msg, (compact, (start, end)) in zip(messages, found):
                ids: list[int] = []
                labels: list[int] = []
                first = image
                for k, token in enumerate(compact):
                    if token == pretokenized.IMAGE_MARK:  # never inside a target (image_in_answer)
                        n = g.positions(prompt, image) if image < len(prompt.images) else 0
                        ids += [g.image_token_id] * n
                        labels += [IGNORE_INDEX] * n
                        image += 1
                    else:
                        ids.append(token)
                        labels.append(token if start <= k < end else IGNORE_INDEX)
                turns.append({"role": msg["role"], "ids": ids, "labels": labels, "images": image - first})
            if image != len(prompt.images):
                found, outcome = None, "bad"
        self.stored_counts[outcome] += 1
        if found is None:
            if self.stored_counts[outcome] == 1:
                log.warning(
                    "%s: the pre-tokenized member %s (%s); tokenizing in the loop, and counting "
                    "such samples in the encoder's stored_counts",
                    prompt.key,
                    _OUTCOMES[outcome],
                    outcome,
                )
            return None
        return turns

    def _layout_pieces(self, messages: list[dict[str, str]]) -> list[Pieces] | None:
        """The reference's pieces from the learned layout of these roles, checked against one
        render of the whole conversation; None where the reference must run."""
        if any(m["role"] == "assistant" and IMAGE_PLACEHOLDER in m["content"] for m in messages):
            return None  # the reference raises image_in_answer at that turn
        roles = tuple(m["role"] for m in messages)
        key = (self.template, roles)
        if key not in self._layouts:
            if len(self._layouts) >= MAX_LAYOUTS:
                self._layouts.clear()  # conversation shapes are few; a flood of them only costs probes
            probe_key = "<layout probe>"
            self._layouts[key] = turn_layout.learn(
                roles, lambda probe: self._prefix_pieces(probe, probe_key), self.template
            )
        layout = self._layouts[key]
        if layout is None:
            return None
        pieces = turn_layout.fill(layout, [m["content"] for m in messages])
        try:
            rendered = self._render(messages)
        except Exception:  # noqa: BLE001 - the reference renders again and raises what it raises
            return None
        return pieces if rendered == "".join(h + t + r for h, t, r in pieces) else None

    def _prefix_pieces(self, messages: list[dict[str, str]], key: str) -> list[Pieces]:
        """The reference: each message's pieces from renders of growing prefixes of the conversation."""
        pieces = []
        prev = ""
        for i, msg in enumerate(messages):
            if msg["role"] == "assistant":
                if IMAGE_PLACEHOLDER in msg["content"]:
                    raise SkipSample("image_in_answer", f"{key}: assistant turn holds an <image> placeholder")
                head = self._render(messages[:i], add_generation_prompt=True)
                full = self._render(messages[: i + 1])
                self._check_prefix(prev, head, key)
                self._check_prefix(head, full, key)
                body = full[len(head) :]
                target = body.rstrip()  # content + end-of-turn marker; the trailing newline is context
                pieces.append((head[len(prev) :], target, body[len(target) :]))
            else:
                full = self._render(messages[: i + 1])
                self._check_prefix(prev, full, key)
                pieces.append((full[len(prev) :], "", ""))
            prev = full
        return pieces

    @staticmethod
    def _check_prefix(prefix: str, text: str, key: str) -> None:
        if not text.startswith(prefix):
            raise ValueError(
                f"chat template does not render conversation prefixes as prefixes (sample {key}); "
                "mmscene cannot locate assistant turns with it: set a different chat template"
            )

    def _tokens(self, text: str, prompt: Prompt, first_image: int, expand_images: bool = True) -> list[int]:
        """``text``'s ids, its ``<image>`` placeholders (images ``first_image`` on) expanded, or
        one ``IMAGE_MARK`` each."""
        parts = text.split(IMAGE_PLACEHOLDER)
        ids: list[int] = []
        g = self.geometry
        for j, part in enumerate(parts):
            if part:
                ids += self.tokenizer(part, add_special_tokens=False)["input_ids"]
            if j < len(parts) - 1:
                if expand_images:
                    ids += [g.image_token_id] * g.positions(prompt, first_image + j)
                else:
                    ids.append(pretokenized.IMAGE_MARK)
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
        sizes = [g.anyres_size(prompt, i) for i in range(n_images)]
        if not any(sizes):
            pixels = preprocess_images(
                prompt.images[:n_images], g.image_size, g.pad_to_square, g.image_mean, g.image_std
            )
        else:  # AnyRes images become their crops (base first), the others one padded square each
            parts = [
                preprocess_images(
                    anyres.crop_images(to_rgb(image), g.grid_pinpoints, g.image_size),
                    g.image_size,
                    False,
                    g.image_mean,
                    g.image_std,
                )
                if size is not None
                else preprocess_images([image], g.image_size, g.pad_to_square, g.image_mean, g.image_std)
                for image, size in zip(prompt.images[:n_images], sizes)
            ]
            pixels = torch.cat(parts)
        out = {
            "pixel_values": pixels,
            "image_pooling": torch.tensor(prompt.pooled[:n_images], dtype=torch.bool),
        }
        if any(sizes):
            out["image_sizes"] = sizes
        return out

    def _assemble(self, turns: list[dict[str, Any]], prompt: Prompt) -> dict[str, Any]:
        ids = [i for t in turns for i in t["ids"]]
        labels = [i for t in turns for i in t["labels"]]
        n_images = sum(t["images"] for t in turns)
        out = self._pixels(prompt, n_images)
        out["input_ids"] = torch.tensor(ids, dtype=torch.long)
        out["labels"] = torch.tensor(labels, dtype=torch.long)
        out["image_positions"] = ids.count(self.geometry.image_token_id)  # host count for the core
        return out


def load_tokenizer(path: str):
    """The training tokenizer from a folder or hub id (no remote code); pads with EOS if unset."""
    from transformers import AutoTokenizer

    if Path(path).exists() and not (Path(path) / "tokenizer_config.json").is_file():
        raise ValueError(f"data.tokenizer: {path} holds no tokenizer (no tokenizer_config.json)")
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
