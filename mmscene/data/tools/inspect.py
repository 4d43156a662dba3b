"""``mmscene data inspect``: look at shard samples the way the model will see them.

Every sample goes through its scenario plugin (``load`` then ``format`` with ``random.Random(0)``),
so what is shown is the interleaved conversation the prompt encoder receives: roles, text and
where each image, video frame or rendered 3D view stands. The terminal gets the conversations
and a media summary; ``--html`` writes a self-contained contact sheet with thumbnails in place of
the ``<image>`` placeholders. Samples a plugin refuses are listed with their skip reason.

For every scenario found, counts and length statistics are computed over up to
``--stats-samples`` samples: text tokens with ``--tokenizer`` (characters without one), plus
image positions at ``--tokens-per-image`` (729 for SigLIP-so400m at 384 px) so that the totals
are what the model's context holds.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import html
import io
import json
import logging
import random
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmscene.data.pipeline.chat_template import DEFAULT_SYSTEM_PROMPT
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
        turns = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}]
        if prompt.conversation and prompt.conversation[0]["role"] == "system":
            turns = []
        turns += prompt.conversation
        # the ChatML text the encoder would tokenize, placeholders excluded
        text = "".join(f"<|im_start|>{t['role']}\n{t['content']}<|im_end|>\n" for t in turns)
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


def _meta_line(item: Shown) -> str:
    # poses are 4x4 matrices per view: too long for a line, and not what a person checks first
    meta = {k: v for k, v in item.prompt.meta.items() if k not in ("poses", "frame_times")}
    return ", ".join(f"{k}={v}" for k, v in meta.items())


# ---------------------------------------------------------------------------------- terminal
def print_report(result: Inspection, console=None) -> None:
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=140)  # piped output: do not squeeze tables to 80 columns
    console.print(Text(f"{result.path}: {len(result.shards)} shard(s)", style="bold"))
    for scenario, items in sorted(result.shown.items()):
        for item in items:
            p = item.prompt
            body = Text()
            body.append("media: ", style="bold")
            body.append(media_summary(item) + "\n")
            meta = _meta_line(item)
            if meta:
                body.append("meta: ", style="bold")
                body.append(meta + "\n")
            captions = iter(image_captions(item))
            for turn in p.conversation:
                style = {"user": "bold cyan", "assistant": "bold green"}.get(turn["role"], "bold magenta")
                body.append(f"\n{turn['role']}: ", style=style)
                parts = turn["content"].split(IMAGE_PLACEHOLDER)
                for j, part in enumerate(parts):
                    body.append(part)
                    if j < len(parts) - 1:
                        body.append(f"[image {next(captions)}]", style="black on yellow")
            title = f"{p.key} · {scenario} · {p.task} · {p.question_type}"
            console.print(Panel(body, title=title, title_align="left", subtitle=Path(item.shard).name))
    if result.skipped:
        total = sum(sum(s.skipped.values()) for s in result.stats.values())
        table = Table(title=f"skipped samples ({_listed(len(result.skipped), total)})")
        for col in ("key", "shard", "scenario", "reason", "detail"):
            table.add_column(col, overflow="fold")
        for s in result.skipped:
            table.add_row(s.key, Path(s.shard).name, s.scenario, s.reason, s.detail)
        console.print(table)
    console.print(stats_table(result))
    for note in stats_notes(result):
        console.print(note)


def _listed(listed: int, total: int) -> str:
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


def stats_table(result: Inspection):
    from rich.table import Table

    table = Table(title="per scenario: samples and lengths per sample")
    cols = ("scenario", "samples", "checked", "skipped", "measure", "min", "median", "mean", "p95", "max")
    for col in cols:
        table.add_column(col, justify="left" if col in ("scenario", "measure") else "right", no_wrap=True)
    table.add_column("tasks", overflow="fold")
    for row in stats_rows(result):
        table.add_row(
            *(str(row[c]) for c in cols[:5]),
            *(f"{row[c]:.0f}" if c != "mean" else f"{row[c]:.1f}" for c in cols[5:]),
            row["tasks"],
        )
    return table


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


# ---------------------------------------------------------------------------------- html
_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { margin-top: 1.5em; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; vertical-align: top; }
td.l, th.l { text-align: left; }
.sample { border: 1px solid #bbb; border-radius: 6px; margin: 1em 0; padding: 0.5em 1em; }
.sample h3 { margin: 0.2em 0; font-size: 1em; } .sample h3 span { font-weight: normal; color: #666; }
.media, .meta { color: #555; font-size: 0.85em; margin: 0.2em 0; }
.turn { display: flex; margin: 0.4em 0; }
.role { min-width: 6em; font-weight: bold; }
.user .role { color: #06c; } .assistant .role { color: #080; } .system .role { color: #a0a; }
.content { white-space: pre-wrap; }
figure { display: inline-block; margin: 2px 4px; vertical-align: middle; text-align: center; }
figure img { height: 128px; border: 1px solid #999; }
figcaption { font-size: 0.7em; color: #555; }
"""


def thumbnail_uri(image: Image.Image, side: int = THUMB_SIDE) -> str:
    """A base64 data URI of a thumbnail: PNG or JPEG, whichever is smaller (flat synthetic
    images compress better as PNG, photos as JPEG)."""
    thumb = image.convert("RGB")
    thumb.thumbnail((side, side), Image.Resampling.LANCZOS)
    candidates = []
    for fmt, mime, kwargs in (
        ("PNG", "image/png", {"optimize": True}),
        ("JPEG", "image/jpeg", {"quality": 85}),
    ):
        buf = io.BytesIO()
        thumb.save(buf, fmt, **kwargs)
        candidates.append((len(buf.getvalue()), mime, buf.getvalue()))
    _, mime, data = min(candidates)
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def render_html(result: Inspection) -> str:
    e = html.escape
    out = [
        "<!doctype html>",
        '<html><head><meta charset="utf-8">',
        f"<title>mmscene inspect: {e(result.path)}</title><style>{_CSS}</style></head><body>",
        f"<h1>mmscene data inspect: {e(result.path)}</h1>",
        f"<p>{len(result.shards)} shard(s); each sample formatted by its scenario plugin with "
        "<code>random.Random(0)</code>; images stand where their <code>&lt;image&gt;</code> placeholders are.</p>",
        "<h2>Scenarios</h2>",
        _stats_html(result),
    ]
    out += [f"<p class='meta'>{e(note)}</p>" for note in stats_notes(result)]
    out.append("<h2>Samples</h2>")
    for scenario, items in sorted(result.shown.items()):
        for item in items:
            out.append(_sample_html(scenario, item))
    total = sum(sum(s.skipped.values()) for s in result.stats.values())
    out.append(f"<h2>Skipped samples ({_listed(len(result.skipped), total)})</h2>")
    if result.skipped:
        out.append(
            "<table class='skipped'><tr><th class='l'>key</th><th class='l'>shard</th>"
            "<th class='l'>scenario</th><th class='l'>reason</th><th class='l'>detail</th></tr>"
        )
        for s in result.skipped:
            out.append(
                f"<tr class='skip' data-key='{e(s.key)}' data-reason='{e(s.reason)}'>"
                f"<td class='l'>{e(s.key)}</td><td class='l'>{e(Path(s.shard).name)}</td>"
                f"<td class='l'>{e(s.scenario)}</td><td class='l'>{e(s.reason)}</td><td class='l'>{e(s.detail)}</td></tr>"
            )
        out.append("</table>")
    else:
        out.append("<p>none</p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _stats_html(result: Inspection) -> str:
    e = html.escape
    cols = (
        "scenario",
        "samples",
        "checked",
        "skipped",
        "measure",
        "min",
        "median",
        "mean",
        "p95",
        "max",
        "tasks",
    )
    rows = ["<table class='stats'><tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"]
    for row in stats_rows(result):
        cells = []
        for c in cols:
            value = row[c]
            text = (
                f"{value:.1f}" if c == "mean" else f"{value:.0f}" if isinstance(value, float) else str(value)
            )
            cls = " class='l'" if c in ("scenario", "measure", "tasks") else ""
            cells.append(f"<td{cls}>{e(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _sample_html(scenario: str, item: Shown) -> str:
    e = html.escape
    p = item.prompt
    captions = image_captions(item)
    parts = [
        f"<section class='sample' data-scenario='{e(scenario)}' data-key='{e(p.key)}' data-images='{len(p.images)}'>",
        f"<h3>{e(p.key)} <span>{e(scenario)} · {e(p.task)} · {e(p.question_type)} · {e(Path(item.shard).name)}</span></h3>",
        f"<p class='media'>{e(media_summary(item))}</p>",
    ]
    meta = _meta_line(item)
    if meta:
        parts.append(f"<p class='meta'>{e(meta)}</p>")
    index = 0
    for turn in p.conversation:
        pieces = turn["content"].split(IMAGE_PLACEHOLDER)
        content = []
        for j, piece in enumerate(pieces):
            content.append(e(piece))
            if j < len(pieces) - 1:
                caption = captions[index]
                content.append(
                    f"<figure><img src='{thumbnail_uri(p.images[index])}' alt='image {index + 1}' "
                    f"title='{e(caption)}'><figcaption>{e(caption)}</figcaption></figure>"
                )
                index += 1
        parts.append(
            f"<div class='turn {e(turn['role'])}'><div class='role'>{e(turn['role'])}</div>"
            f"<div class='content'>{''.join(content)}</div></div>"
        )
    parts.append("</section>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------- CLI
def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="a shard .tar, or a folder of shards (searched recursively)")
    parser.add_argument("--n", type=int, default=2, help="samples shown per scenario (default 2)")
    parser.add_argument("--html", type=Path, help="write a self-contained HTML contact sheet here")
    parser.add_argument(
        "--tokenizer", help="tokenizer folder for token counts (default: the --config's, else characters)"
    )
    parser.add_argument(
        "--scenario", help="read every sample with this plugin instead of the record's own scenario"
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="training YAML: take plugin options (data.scenarios) and data.tokenizer from it",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="SCENARIO.KEY=VALUE",
        help="plugin option, e.g. 3d.num_views=4 (YAML value; repeatable; overrides --config)",
    )
    parser.add_argument(
        "--tokens-per-image", type=int, default=DEFAULT_TOKENS_PER_IMAGE, help="image positions per image"
    )
    parser.add_argument(
        "--tokens-per-pooled-image",
        type=int,
        help="positions per pooled video frame (default: --tokens-per-image)",
    )
    parser.add_argument(
        "--stats-samples",
        type=int,
        default=1000,
        help="samples per scenario decoded for the length statistics (0: all)",
    )


def _parse_options(config: Path | None, pairs: list[str]) -> tuple[dict[str, dict[str, Any]], str | None]:
    import yaml

    options: dict[str, dict[str, Any]] = {}
    tokenizer = None
    if config is not None:
        doc = yaml.safe_load(config.read_text()) or {}
        data = doc.get("data") or {}
        for name, opts in (data.get("scenarios") or {}).items():
            options[str(name)] = dict(opts or {})
        tokenizer = data.get("tokenizer")
    for pair in pairs:
        lhs, sep, value = pair.partition("=")
        name, dot, key = lhs.partition(".")
        if not sep or not dot or not name or not key:
            raise ValueError(f"--option {pair!r}: expected SCENARIO.KEY=VALUE")
        options.setdefault(name, {})[key] = yaml.safe_load(value)
    return options, tokenizer


def inspect_main(args: argparse.Namespace) -> int:
    if args.n < 0 or args.tokens_per_image < 1 or args.stats_samples < 0:
        print("error: --n and --stats-samples must be >= 0, --tokens-per-image >= 1", file=sys.stderr)
        return 2
    try:
        options, config_tokenizer = _parse_options(args.config, args.option)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tokenizer = None
    tokenizer_path = args.tokenizer or config_tokenizer
    if tokenizer_path:
        # transformers directly: the training data module would pull in Lightning (seconds)
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path), trust_remote_code=False)
        except (OSError, ValueError) as err:
            print(f"error: cannot load tokenizer {tokenizer_path}: {err}", file=sys.stderr)
            return 2
    try:
        result = inspect_path(
            args.path,
            n=args.n,
            scenario=args.scenario,
            options=options,
            tokenizer=tokenizer,
            tokens_per_image=args.tokens_per_image,
            tokens_per_pooled_image=args.tokens_per_pooled_image,
            stats_samples=args.stats_samples or None,
        )
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_report(result)
    if args.html is not None:
        args.html.parent.mkdir(parents=True, exist_ok=True)
        args.html.write_text(render_html(result), encoding="utf-8")
        print(f"wrote {args.html}")
    usable = sum(len(s.text) for s in result.stats.values())
    return 0 if usable else 1  # nothing usable at all is worth a failing exit status in scripts


__all__ = [
    "Inspection",
    "add_inspect_arguments",
    "image_captions",
    "inspect_main",
    "inspect_path",
    "media_summary",
    "print_report",
    "render_html",
    "summarize",
    "thumbnail_uri",
]
