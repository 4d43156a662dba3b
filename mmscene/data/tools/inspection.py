"""What ``mmscene data inspect`` finds in shards: every sample through its scenario plugin
(``load``, then ``format`` with ``random.Random(0)``), the prompts it shows, the skips with their
reasons, and per-scenario counts and length statistics. Rendered by :mod:`.inspect_terminal` and
:mod:`.inspect_html`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mmscene.data.pipeline.chat_template import DEFAULT_SYSTEM_PROMPT, render_chat
from mmscene.data.tar_reader import EMPTY_SHARD, TRUNCATED_SHARD, Defect, read_shard
from mmscene.scenario import IMAGE_PLACEHOLDER, Example, Prompt, SkipSample

log = logging.getLogger(__name__)

DEFAULT_TOKENS_PER_IMAGE = 729  # 27 x 27 SigLIP-so400m patches, the interleave models' count
THUMB_SIDE = 192
SKIPS_LISTED = 20  # per scenario and reason; the rest are only counted
# Stand-in id for image positions when measuring lengths: never a real token id, so the count of
# image positions does not depend on the tokenizer having an "<image>" token.
_IMAGE_SENTINEL = -1


# ---------------------------------------------------------------------------------- results
@dataclasses.dataclass
class Shown:
    """A sample that loaded and formatted, kept for display."""

    shard: str
    example: Example
    prompt: Prompt
    members: dict[str, int]  # member suffix -> bytes


@dataclasses.dataclass
class Skipped:
    key: str
    shard: str
    scenario: str
    reason: str
    detail: str


@dataclasses.dataclass
class ScenarioStats:
    samples: int = 0  # samples in the shards
    checked: int = 0  # samples loaded and formatted (at most --stats-samples)
    skipped: Counter = dataclasses.field(default_factory=Counter)
    tasks: Counter = dataclasses.field(default_factory=Counter)
    text: list[int] = dataclasses.field(default_factory=list)
    images: list[int] = dataclasses.field(default_factory=list)
    image_tokens: list[int] = dataclasses.field(default_factory=list)

    @property
    def totals(self) -> list[int]:
        return [a + b for a, b in zip(self.text, self.image_tokens)]


@dataclasses.dataclass
class Inspection:
    path: str
    shards: list[str]
    text_unit: str  # "tokens" or "characters"
    tokens_per_image: int
    tokens_per_pooled_image: int
    shown: dict[str, list[Shown]] = dataclasses.field(default_factory=dict)
    skipped: list[Skipped] = dataclasses.field(default_factory=list)
    stats: dict[str, ScenarioStats] = dataclasses.field(default_factory=dict)


def summarize(values: list[int]) -> dict[str, float]:
    """min / median / mean / p95 / max of a list of lengths (empty: all zero)."""
    if not values:
        return dict.fromkeys(("min", "median", "mean", "p95", "max"), 0.0)
    arr = np.asarray(values, dtype=np.float64)
    return {
        "min": float(arr.min()),
        "median": float(np.median(arr)),
        "mean": float(arr.mean()),
        "p95": float(np.percentile(arr, 95)),
        "max": float(arr.max()),
    }


# ---------------------------------------------------------------------------------- reading
def find_shards(path: str | Path) -> list[str]:
    from mmscene.data.pipeline.stream import expand_shards

    return expand_shards(str(path))


def _samples(shard: str) -> Iterator[dict[str, Any] | Defect]:
    """Raw samples of one shard, read exactly as the training streams read them: by the same tar
    reader, with the same defects, and samples the shard index expects but the tar lacks."""
    from mmscene.data.shards import indexed_shard

    seen = 0
    for index, item in read_shard(shard):
        seen = index + 1
        if isinstance(item, Defect) and item.fatal:
            yield item
            return
        yield item
    if seen == 0:
        yield Defect(EMPTY_SHARD, f"{shard}: a tar without samples", fatal=True)
        return
    entry = indexed_shard(shard)
    if entry is not None and entry["samples"] > seen:
        missing = entry["samples"] - seen
        yield Defect(TRUNCATED_SHARD, f"{shard}: {missing} of {entry['samples']} samples missing", fatal=True)


def _record(sample: dict[str, Any]) -> dict[str, Any] | None:
    try:
        record = json.loads(sample["json"])
    except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


class _Lengths:
    """Text length (tokens or characters) and image positions of a formatted prompt."""

    def __init__(self, tokenizer: Any, tokens_per_image: int, tokens_per_pooled_image: int):
        self.tokens_per_image = tokens_per_image
        self.tokens_per_pooled_image = tokens_per_pooled_image
        self.encoder = None
        if tokenizer is not None:
            from mmscene.data.pipeline.encode import ImageGeometry, PromptEncoder

            # Only lengths are wanted: a tiny image size keeps the pixel preprocessing negligible.
            geometry = ImageGeometry(
                image_size=8,
                image_token_id=_IMAGE_SENTINEL,
                tokens_per_image=tokens_per_image,
                tokens_per_pooled_image=tokens_per_pooled_image,
            )
            self.encoder = PromptEncoder(tokenizer, geometry, DEFAULT_SYSTEM_PROMPT, max_length=None)

    def __call__(self, prompt: Prompt) -> tuple[int, int]:
        """``(text length, image positions)``; raises SkipSample as the encoder would in training."""
        if self.encoder is not None:
            ids = self.encoder.encode(prompt)["input_ids"]
            image_positions = int((ids == _IMAGE_SENTINEL).sum())
            return int(ids.numel()) - image_positions, image_positions
        image_positions = sum(
            self.tokens_per_pooled_image if p else self.tokens_per_image for p in prompt.pooled
        )
        # the ChatML text the encoder would tokenize, placeholders excluded
        text = render_chat(prompt.conversation)
        return len(text.replace(IMAGE_PLACEHOLDER, "")), image_positions


def inspect_path(
    path: str | Path,
    n: int = 2,
    scenario: str | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    tokenizer: Any = None,
    tokens_per_image: int = DEFAULT_TOKENS_PER_IMAGE,
    tokens_per_pooled_image: int | None = None,
    stats_samples: int | None = 1000,
) -> Inspection:
    """Read every shard under ``path``; keep ``n`` formatted samples per scenario for display.

    ``scenario`` reads every sample with that plugin (as a training source's ``scenario:`` does)
    instead of the record's own ``scenario`` field. ``stats_samples`` caps the samples per
    scenario that are decoded for the length statistics (``None``: all).
    """
    from mmscene.registry import get_scenario

    shards = find_shards(path)
    if not shards:
        raise FileNotFoundError(f"no shards (*.tar) at {path}")
    pooled_tokens = tokens_per_image if tokens_per_pooled_image is None else tokens_per_pooled_image
    result = Inspection(
        path=str(path),
        shards=shards,
        text_unit="tokens" if tokenizer is not None else "characters",
        tokens_per_image=tokens_per_image,
        tokens_per_pooled_image=pooled_tokens,
    )
    lengths = _Lengths(tokenizer, tokens_per_image, pooled_tokens)
    plugins: dict[str, Any] = {}
    options = options or {}

    def plugin_for(name: str):
        if name not in plugins:
            try:
                plugins[name] = get_scenario(name, **options.get(name, {}))
            except (ValueError, TypeError) as err:
                plugins[name] = err  # reported on every sample of that scenario
        return plugins[name]

    for shard in shards:
        for sample in _samples(shard):
            if isinstance(sample, Defect):  # counted under the reason the training stream uses
                name = scenario or Path(shard).parent.name
                key = sample.key or ("(rest of shard)" if sample.fatal else "?")
                result.skipped.append(Skipped(key, shard, name, sample.reason, sample.detail))
                result.stats.setdefault(name, ScenarioStats()).skipped[sample.reason] += 1
                continue
            _inspect_sample(sample, shard, scenario, plugin_for, lengths, result, n, stats_samples)
    return result


def _inspect_sample(sample, shard, forced, plugin_for, lengths, result: Inspection, n, stats_samples) -> None:
    key = sample.get("__key__", "?")
    record = _record(sample)
    # Without a readable record, the converter's layout (OUT/<scenario>/shard-*.tar) names it.
    name = forced or (record or {}).get("scenario") or Path(shard).parent.name
    name = str(name)
    stats = result.stats.setdefault(name, ScenarioStats())
    stats.samples += 1
    if record is not None:
        stats.tasks[str(record.get("task", "?"))] += 1
    shown = result.shown.setdefault(name, [])
    want_stats = stats_samples is None or stats.checked < stats_samples
    if len(shown) >= n and not want_stats:
        return
    stats.checked += 1

    def skip(reason: str, detail: str) -> None:
        stats.skipped[reason] += 1
        if stats.skipped[reason] <= SKIPS_LISTED:
            result.skipped.append(Skipped(key, shard, name, reason, detail))

    plugin = plugin_for(name)
    if isinstance(plugin, Exception):
        skip("no_plugin", str(plugin))
        return
    try:
        example = plugin.load(sample)
        prompt = plugin.format(example, random.Random(0))
        text_len, image_positions = lengths(prompt)
    except SkipSample as err:
        skip(err.reason, err.detail)
        return
    except Exception as err:  # noqa: BLE001 - same policy as the mixer: a broken sample is a skip
        skip(f"error_{type(err).__name__}", str(err))
        return
    stats.text.append(text_len)
    stats.images.append(len(prompt.images))
    stats.image_tokens.append(image_positions)
    if len(shown) < n:
        members = {k: len(v) for k, v in sample.items() if not k.startswith("__") and isinstance(v, bytes)}
        shown.append(Shown(shard, example, prompt, members))


# ---------------------------------------------------------------------------------- describing
def _size(n: int) -> str:
    return f"{n / 1024:.1f} KB" if n >= 1024 else f"{n} B"


def image_captions(item: Shown) -> list[str]:
    """One caption per image of the prompt: index, size, pooled, frame time when known."""
    prompt, example = item.prompt, item.example
    times = example.frame_times if len(example.frame_times) == len(prompt.images) else []
    captions = []
    for i, img in enumerate(prompt.images):
        text = f"#{i + 1} {img.width}×{img.height}"
        if times:
            text += f" t={times[i]:.2f}s"
        if prompt.pooled[i]:
            text += " pooled"
        captions.append(text)
    return captions


def media_summary(item: Shown) -> str:
    """What the shard holds for the sample and what the plugin made of it."""
    record = item.example.record or {}
    stored = []
    for m in record.get("media", []):
        member = m.get("member", "?")
        stored.append(f"{m.get('type', '?')} {member} ({_size(item.members.get(member, 0))})")
    prompt = item.prompt
    sizes = sorted({f"{img.width}×{img.height}" for img in prompt.images})
    n_pooled = sum(prompt.pooled)
    made = f"{len(prompt.images)} image{'s' if len(prompt.images) != 1 else ''}"
    if sizes:
        made += f" {', '.join(sizes)}"
    if n_pooled:
        made += f", {n_pooled} pooled"
    if item.example.frame_times:
        made += f", frames at {', '.join(f'{t:.2f}' for t in item.example.frame_times)} s"
    return f"{'; '.join(stored) or 'no media'} → {made}"


def meta_line(item: Shown) -> str:
    # poses are 4x4 matrices per view: too long for a line, and not what a person checks first
    meta = {k: v for k, v in item.prompt.meta.items() if k not in ("poses", "frame_times")}
    return ", ".join(f"{k}={v}" for k, v in meta.items())


def listed_of(listed: int, total: int) -> str:
    return str(total) if listed == total else f"{total}, first {SKIPS_LISTED} per scenario and reason listed"


def stats_rows(result: Inspection) -> list[dict[str, Any]]:
    rows = []
    unit = "tokens" if result.text_unit == "tokens" else "chars"
    for scenario, s in sorted(result.stats.items()):
        base = {
            "scenario": scenario,
            "samples": s.samples,
            "checked": s.checked,
            "skipped": sum(s.skipped.values()),
            "tasks": ", ".join(f"{t}:{c}" for t, c in sorted(s.tasks.items())),
        }
        measures = [
            (f"text {unit}", s.text),
            ("images", s.images),
            ("image tokens", s.image_tokens),
            ("total" if unit == "tokens" else "chars + image tokens", s.totals),
        ]
        for i, (what, values) in enumerate(measures):
            row = base if i == 0 else dict.fromkeys(base, "")
            rows.append({**row, "measure": what, **summarize(values)})
    return rows


def stats_notes(result: Inspection) -> list[str]:
    notes = [
        f"image tokens: {result.tokens_per_image} per image, {result.tokens_per_pooled_image} per pooled "
        "video frame (--tokens-per-image / --tokens-per-pooled-image)"
    ]
    if result.text_unit != "tokens":
        notes.append(
            "text lengths are in characters of the ChatML-rendered conversation (no --tokenizer given); "
            "pass --tokenizer DIR for token counts"
        )
    partial = [
        f"{k} {s.checked}/{s.samples}" for k, s in sorted(result.stats.items()) if s.checked < s.samples
    ]
    if partial:
        notes.append(f"lengths measured on the first samples only (--stats-samples): {', '.join(partial)}")
    return notes
