"""A model ready to answer evaluation requests exactly as ``mmscene validate`` would.

A request (question text plus PIL images or a video path) becomes an annotation row, goes
through the converter's own record preparation (placeholders, media checks) and the scenario
plugin's ``load`` / ``format`` into the training encoder, so its prompt, placement and pixels
are those of the same sample converted into shards and validated. Nothing here turns a failure
into an answer: a request that cannot be prepared raises :class:`EvaluationError`.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import random
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mmscene.data.ingest.annotations import Item
from mmscene.data.ingest.interleave_bench import InlineImage, bench_scenario
from mmscene.data.ingest.records import RecordContext, ordered_rules, prepare
from mmscene.data.ingest.shard_writer import safe_key
from mmscene.data.pipeline.chat_template import DEFAULT_SYSTEM_PROMPT
from mmscene.data.pipeline.collate import pad_collate
from mmscene.data.pipeline.encode import ImageGeometry, PromptEncoder
from mmscene.registry import get_scenario
from mmscene.skips import SkipSample

log = logging.getLogger(__name__)


class EvaluationError(SystemExit):
    """A request the model cannot answer. A ``SystemExit`` (status 1 with the message) on purpose:
    lmms-eval's CLI turns exceptions into a log line and exit status 0 unless ``--verbosity
    DEBUG``, and a failed evaluation must not look like a finished one."""

    def __init__(self, message: str):
        super().__init__(f"mmscene evaluation failed: {message}")


@dataclasses.dataclass
class DataSettings:
    """The data-side settings a model was trained with (the run's ``data:`` section)."""

    tokenizer: str | None = None
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    pad_to_square: bool = True
    max_length: int | None = None
    scenarios: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, data: dict[str, Any]) -> DataSettings:
        return cls(
            tokenizer=data.get("tokenizer"),
            system_prompt=data.get("system_prompt", DEFAULT_SYSTEM_PROMPT),
            pad_to_square=bool(data.get("pad_to_square", True)),
            max_length=data.get("max_length"),
            scenarios=dict(data.get("scenarios") or {}),
        )


class EvalSession:
    """``model`` + ``tokenizer`` + the encoder and scenario plugins of training."""

    def __init__(
        self,
        model,
        tokenizer,
        settings: DataSettings,
        scenarios: dict[str, Any] | None = None,
        multi_view_tasks: tuple[str, ...] = (),
    ):
        if tokenizer is None:
            raise EvaluationError("the checkpoint has no tokenizer; pass tokenizer=DIR")
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        geometry = ImageGeometry.of(model, settings.pad_to_square)
        self.encoder = PromptEncoder(
            tokenizer, geometry, settings.system_prompt, max_length=settings.max_length
        )
        self.scenarios = dict(scenarios or {})
        self.multi_view_tasks = tuple(multi_view_tasks)

    # ------------------------------------------------------------------ requests -> samples
    def scenario_for(self, visuals: list[Any], task: str, doc: dict[str, Any]) -> str:
        """The plugin a request's media go to: the converter's choice for the same sample (a
        bench row by its sub_task; else by media), or ``3d`` for tasks named multi-view."""
        if visuals and isinstance(visuals[0], str):
            return "video"
        if task in self.multi_view_tasks:
            return "3d"
        if isinstance(doc, dict) and "sub_task" in doc:
            return bench_scenario(doc)
        return "single_image" if len(visuals) == 1 else "multi_image"

    def plugin(self, name: str):
        if name not in self.scenarios:
            self.scenarios[name] = get_scenario(name, **self.settings.scenarios.get(name, {}))
        return self.scenarios[name]

    def encode(
        self, key: str, context: str, visuals: list[Any], scenario: str, continuation: str | None = None
    ) -> dict[str, Any]:
        """The generation prompt of one request (``continuation``: also its tokens, for likelihood)."""
        key = safe_key(key)
        row, root = _annotation_row(key, context, visuals)
        ctx = RecordContext(
            media_root=str(root), scenario=scenario, rules=ordered_rules(), source_file="lmms-eval"
        )
        prepared = prepare(ctx, Item(index=0, record=row))
        if prepared.reason:
            raise EvaluationError(f"request {key}: {prepared.reason}: {prepared.detail}")
        sample = {"__key__": key, **dict(prepared.members)}
        plugin = self.plugin(scenario)
        try:
            example = plugin.load(sample)
            # validation's per-sample formatting seed (mmscene.data.pipeline.eval_samples)
            prompt = plugin.format(example, random.Random(f"eval-{key}"))
            encoded = self.encoder.encode_for_generation(prompt)
        except SkipSample as skip:
            raise EvaluationError(f"request {key}: {skip.reason}: {skip.detail}") from skip
        if continuation is not None:
            cont = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            if not cont:
                raise EvaluationError(f"request {key}: empty continuation")
            encoded["continuation"] = torch.tensor(cont, dtype=torch.long)
        return encoded

    # ------------------------------------------------------------------ model calls
    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = pad_collate(samples, self.tokenizer.pad_token_id, left=True)
        return _to(batch, self.device, self.dtype)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def loglikelihood(self, sample: dict[str, Any]) -> tuple[float, bool]:
        """Summed log-probability of the continuation after the prompt, and whether greedy
        decoding would produce it."""
        cont = sample["continuation"]
        ids = torch.cat([sample["input_ids"], cont])
        batch = self.collate([{**sample, "input_ids": ids}])
        logits = self.model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                            image_pooling=batch["image_pooling"]).logits  # fmt: skip
        n = cont.shape[0]
        scores = torch.log_softmax(logits[0, -n - 1 : -1].float(), dim=-1)
        target = cont.to(scores.device)
        logprob = scores.gather(1, target[:, None]).sum().item()
        return float(logprob), bool((scores.argmax(-1) == target).all())


def _annotation_row(key: str, context: str, visuals: list[Any]) -> tuple[dict[str, Any], Path]:
    """An annotation row of the converter's LLaVA layout for this request, and its media root
    (images travel in the row, in memory, as a bench row's embedded ones do)."""
    row: dict[str, Any] = {
        "id": key,
        "conversations": [{"from": "human", "value": context}, {"from": "gpt", "value": ""}],
    }
    if not visuals:
        raise EvaluationError(f"request {key} has no image or video; mmscene's scenarios answer about media")
    if all(isinstance(v, Image.Image) for v in visuals):
        row["image"] = [InlineImage(_png(image), slot=f"image_{i}") for i, image in enumerate(visuals)]
        return row, Path.cwd()  # nothing is read from it
    if len(visuals) == 1 and isinstance(visuals[0], str):
        video = Path(visuals[0]).resolve()
        row["video"] = video.name
        return row, video.parent
    kinds = sorted({type(v).__name__ for v in visuals})
    raise EvaluationError(f"request {key}: visuals of types {kinds} (expected PIL images or one video path)")


def _png(image: Image.Image) -> bytes:
    """Lossless: the pixels the harness handed over, unchanged."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _to(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out
