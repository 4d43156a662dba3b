"""``mmscene data tokenize``: add the pre-tokenized form (``KEY.tokens.json``) to shards.

Each sample is loaded and formatted by its plugin, with the options training will use, and every
prompt the plugin can make of it (:meth:`~mmscene.scenario.Scenario.prompt_variants`) is
tokenized with the training tokenizer, chat template and system prompt
(:mod:`mmscene.data.pipeline.pretokenized`). Training then reads the ids instead of rendering
and tokenizing; the media are still decoded per step.

A shard is rewritten beside itself (``*.tar.part``, then renamed) with every member kept
byte for byte and the folder's index updated; a sample its plugin skips keeps no tokens (training
skips it too, and counts it). A shard with a defect (truncated, unsafe or duplicate members) is
left as it is and reported: its readable samples still train, tokenized in the loop. Do not
rewrite shards a running job is reading.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import logging
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from mmscene.data.ingest.shard_writer import add_member
from mmscene.data.pipeline import pretokenized
from mmscene.data.pipeline.chat_template import DEFAULT_SYSTEM_PROMPT
from mmscene.data.pipeline.stream import expand_shards
from mmscene.data.shards import SHARD_GLOB, indexed_shard, update_index
from mmscene.data.tar_reader import TRUNCATED_SHARD, Defect, read_shard
from mmscene.scenario import SkipSample

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TokenizeSpec:
    """What decides the ids: the tokenizer, the system prompt and each plugin's options."""

    tokenizer: str
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    scenarios: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ShardReport:
    shard: str
    tokenized: int = 0
    variants: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    left_as_is: str = ""  # why the shard was not rewritten


_WORKER: dict[Any, Any] = {}


def _tools(spec: TokenizeSpec, scenario: str):
    """The plugin and encoder of a spec, built once per process."""
    key = (spec.tokenizer, spec.system_prompt, repr(sorted(spec.scenarios.items())), scenario)
    if key not in _WORKER:
        from mmscene.data.pipeline.encode import ImageGeometry, PromptEncoder, load_tokenizer
        from mmscene.registry import get_scenario

        # the stored form marks each image once and expands none: no geometry is consulted
        geometry = ImageGeometry(
            image_size=0, image_token_id=-1, tokens_per_image=1, tokens_per_pooled_image=1
        )
        encoder = PromptEncoder(load_tokenizer(spec.tokenizer), geometry, spec.system_prompt)
        _WORKER[key] = (get_scenario(scenario, **spec.scenarios.get(scenario, {})), encoder)
    return _WORKER[key]


def tokenize_shard(path: str, scenario: str, spec: TokenizeSpec) -> ShardReport:
    """Rewrite one shard with each sample's pre-tokenized member."""
    plugin, encoder = _tools(spec, scenario)
    report = ShardReport(path)
    part = path + ".part"
    count = 0
    with tarfile.open(part, "w", format=tarfile.PAX_FORMAT) as out:
        for _, sample in read_shard(path):
            if isinstance(sample, Defect):
                report.left_as_is = f"{sample.reason}: {sample.detail}"
                break
            count += 1
            members = [
                (k, v) for k, v in sample.items() if not k.startswith("__") and k != pretokenized.MEMBER
            ]
            stored = _stored(plugin, encoder, sample, report)
            if stored is not None:
                members.append((pretokenized.MEMBER, stored))
            for suffix, data in members:
                add_member(out, f"{sample['__key__']}.{suffix}", data)
    entry = indexed_shard(path)
    if not report.left_as_is and entry is not None and entry["samples"] != count:
        # cut at a tar block boundary, a shard reads as a clean shorter one: only its index tells
        report.left_as_is = f"{TRUNCATED_SHARD}: {count} of the {entry['samples']} samples its index lists"
    if report.left_as_is:
        os.unlink(part)
        report.tokenized = report.variants = 0
        report.skipped.clear()
    else:
        os.replace(part, path)
    return report


def _stored(plugin, encoder, sample: dict[str, Any], report: ShardReport) -> bytes | None:
    try:
        example = plugin.load(sample)
        variants = dict(encoder.stored_form(prompt) for prompt in plugin.prompt_variants(example))
    except SkipSample as skip:
        report.skipped[skip.reason] += 1
        return None
    except Exception as err:  # noqa: BLE001 - the sample stays as it is; training counts it the same way
        log.warning("%s: %s", sample["__key__"], err)
        report.skipped[f"error_{type(err).__name__}"] += 1
        return None
    report.tokenized += 1
    report.variants += len(variants)
    return pretokenized.dump(encoder.fingerprint, variants)


def tokenize_folders(
    targets: list[tuple[list[str], str]], spec: TokenizeSpec, workers: int = 1, progress: bool = False
) -> list[ShardReport]:
    """Pre-tokenize ``[(shard paths, scenario)]``; one shard per task, ``workers`` processes."""
    from rich.progress import track

    jobs = [(path, scenario) for shards, scenario in targets for path in shards]
    if not jobs:
        raise FileNotFoundError("no shards to tokenize")
    with contextlib.ExitStack() as stack:
        if workers > 1:
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers))
            done = pool.map(tokenize_shard, *zip(*jobs), [spec] * len(jobs))
        else:
            done = (tokenize_shard(path, scenario, spec) for path, scenario in jobs)
        reports = list(track(done, "tokenizing shards", total=len(jobs), disable=not progress))
    by_folder: dict[Path, dict[str, int]] = collections.defaultdict(dict)
    for report in reports:
        if not report.left_as_is:
            path = Path(report.shard)
            by_folder[path.parent][path.name] = report.tokenized + sum(report.skipped.values())
    for folder, counts in by_folder.items():
        update_index(folder, counts)
    return reports


# -- which shards, and with what -------------------------------------------------------------
def spec_from_config(path: Path | str) -> tuple[TokenizeSpec, list[tuple[str, str]]]:
    """The spec a training config trains with, and its training sources ``[(shards, scenario)]``."""
    doc = yaml.safe_load(Path(path).read_text()) or {}
    data = doc.get("data") or {}
    data = data.get("init_args", data)
    if not data.get("tokenizer"):
        raise ValueError(f"{path}: data.tokenizer is not set")
    spec = TokenizeSpec(
        tokenizer=str(data["tokenizer"]),
        system_prompt=data.get("system_prompt", DEFAULT_SYSTEM_PROMPT),
        scenarios={k: dict(v or {}) for k, v in (data.get("scenarios") or {}).items()},
    )
    return spec, [(s["shards"], s["scenario"]) for s in data.get("train") or []]


def resolve_targets(paths: list[str], scenario: str | None) -> list[tuple[list[str], str]]:
    """Shard lists with their scenario: a shard folder is named by its scenario (as ``mmscene data
    convert`` writes them) unless ``scenario`` is given; a conversion's folder stands for its
    scenario folders."""
    targets = []
    for text in paths:
        path = Path(text)
        if path.is_dir() and not any(path.glob(SHARD_GLOB)):
            folders = [d for d in sorted(path.iterdir()) if d.is_dir() and any(d.glob(SHARD_GLOB))]
            if not folders:
                raise FileNotFoundError(f"{path} holds no shards")
            targets += [(expand_shards(str(d)), scenario or d.name) for d in folders]
            continue
        shards = expand_shards(text)
        if not shards:
            raise FileNotFoundError(f"no shards match {text}")
        targets.append((shards, scenario or (path if path.is_dir() else Path(shards[0]).parent).name))
    return targets


def add_tokenize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths",
        nargs="*",
        metavar="SHARDS",
        help="shard folders, globs or a conversion's folder (default: the config's training sources)",
    )
    parser.add_argument(
        "--config", type=Path, help="training config: its tokenizer, system prompt and scenario options"
    )
    parser.add_argument("--tokenizer", help="tokenizer folder (instead of, or over, the config's)")
    parser.add_argument("--scenario", help="scenario of every path (default: each folder's name)")
    parser.add_argument("--workers", type=int, default=1, help="processes, one shard each (default 1)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def make_spec(config: Path | str | None, tokenizer: str | None) -> tuple[TokenizeSpec, list[tuple[str, str]]]:
    """The spec of ``--config`` and / or ``--tokenizer`` (which wins), with the config's sources."""
    spec, sources = spec_from_config(config) if config else (None, [])
    if tokenizer:
        spec = dataclasses.replace(spec, tokenizer=tokenizer) if spec else TokenizeSpec(tokenizer)
    if spec is None:
        raise ValueError("give --config X.yaml or --tokenizer DIR")
    return spec, sources


def tokenize_conversion(
    out: Path | str, config: Path | str | None, tokenizer: str | None, workers: int = 1, progress: bool = True
) -> int:
    """``mmscene data convert --tokenizer / --config``: the shards its ``report.json`` lists."""

    def targets(_sources) -> list[tuple[list[str], str]]:
        report = json.loads((Path(out) / "report.json").read_text(encoding="utf-8"))
        return [([str(Path(out) / path) for path in paths], name) for name, paths in report["shards"].items()]

    return _tokenize(config, tokenizer, targets, workers, progress)


def tokenize_main(args: argparse.Namespace) -> int:
    """0: every shard rewritten; 1: some left as they were; 2: bad options or input."""

    def targets(sources: list[tuple[str, str]]) -> list[tuple[list[str], str]]:
        if args.paths:
            return resolve_targets(args.paths, args.scenario)
        if not sources:
            raise ValueError("no shards: give SHARDS or a --config with data.train sources")
        found = [(expand_shards(shards), scenario) for shards, scenario in sources]
        empty = [shards for (shards, _), (paths, _) in zip(sources, found) if not paths]
        if empty:
            raise FileNotFoundError(f"no shards match {empty[0]}")
        return found

    return _tokenize(
        args.config, args.tokenizer, targets, max(1, args.workers), getattr(args, "progress", True)
    )


def _tokenize(config, tokenizer, targets, workers: int, progress: bool) -> int:
    """The spec of ``config`` / ``tokenizer``, applied to ``targets(config's sources)``; bad options
    or input print one error line and give 2."""
    try:
        spec, sources = make_spec(config, tokenizer)
        reports = tokenize_folders(targets(sources), spec, workers, progress)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}")
        return 2
    return print_reports(reports)


def print_reports(reports: list[ShardReport]) -> int:
    skipped = sum((r.skipped for r in reports), collections.Counter())
    left = [r for r in reports if r.left_as_is]
    print(
        f"pre-tokenized {sum(r.tokenized for r in reports)} samples "
        f"({sum(r.variants for r in reports)} prompts) in {len(reports) - len(left)} shards"
    )
    if skipped:
        print(
            "not tokenized (their plugin skips them): "
            + ", ".join(f"{k} {n}" for k, n in sorted(skipped.items()))
        )
    for r in left:
        print(f"left as it was: {r.shard} ({r.left_as_is})")
    return 1 if left else 0
