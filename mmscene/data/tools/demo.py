"""``mmscene data demo``: a synthetic four-scenario dataset that a tiny CPU model learns from pixels.

Every question is answerable from the media alone (colours, shapes, which image differs, which
way a square moves, which solid a mesh is), and every answer class is equally frequent, so the
chance levels written to ``summary.json`` are the baseline a trained demo model must beat.

The generator writes what a user would bring (LLaVA/M4-Instruct-style ``train.jsonl`` and
``val.jsonl`` beside real ``.png``/``.mp4``/``.glb`` files under ``OUT/raw``) and then runs the real
converter on it, so the demo exercises the same path as user data:

    OUT/raw/{train,val}.jsonl, OUT/raw/media/...     annotations + media
    OUT/{train,val}/<scenario>/shard-*.tar           converted WebDataset shards
    OUT/tokenizer/                                   a local BPE tokenizer for the tiny model
    OUT/summary.json, OUT/DONE                       counts, chance levels, parameters
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from mmscene.data.pipeline.chat_template import render_chat
from mmscene.data.tools.demo_tasks import (
    SCENARIOS,
    TASKS,
    Generator,
)

# Bump when the generated content changes, so an old OUT/DONE no longer counts as done.
DEMO_VERSION = 4
SPLITS = ("train", "val")
# The tiny demo LLM (mmscene/model/configs/tiny-qwen2.json) has 512 embeddings.
TOKENIZER_VOCAB_SIZE = 512
OWNED = ("raw", "train", "val", "tokenizer", "summary.json", "DONE")


# ---------------------------------------------------------------------------------------- public
def make_demo(
    out: Path | str,
    n_train_per_scenario: int = 2000,
    n_val_per_scenario: int = 100,
    seed: int = 0,
    image_px: int = 64,
    num_frames: int = 6,
    progress: bool = True,
    option_order: str = "fixed",
) -> dict[str, Any]:
    """Generate (or find already generated) the demo dataset under ``out``; return its summary."""
    if n_train_per_scenario < 1 or n_val_per_scenario < 1:
        raise ValueError("the demo needs at least one train and one val sample per scenario")
    if image_px < 24 or image_px % 2:
        raise ValueError(f"image_px must be an even number >= 24 (yuv420p video), got {image_px}")
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2 for motion to be visible, got {num_frames}")
    if option_order not in ("fixed", "shuffled"):
        raise ValueError(f"option_order must be 'fixed' or 'shuffled', got {option_order!r}")
    out = Path(out)
    params = {
        "version": DEMO_VERSION,
        "n_train_per_scenario": n_train_per_scenario,
        "n_val_per_scenario": n_val_per_scenario,
        "seed": seed,
        "image_px": image_px,
        "num_frames": num_frames,
        "option_order": option_order,
    }
    done = out / "DONE"
    if done.is_file() and (out / "summary.json").is_file():
        try:
            if json.loads(done.read_text()) == params:
                return json.loads((out / "summary.json").read_text())
        except json.JSONDecodeError:
            pass  # a damaged marker: regenerate
    # A partial or differently parameterised run: clear only what this generator writes.
    for name in OWNED:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    raw = out / "raw"
    media_root = raw / "media"
    counts = {"train": n_train_per_scenario, "val": n_val_per_scenario}
    records: dict[str, list[dict[str, Any]]] = {}
    for split in SPLITS:
        records[split] = []
        for scenario in SCENARIOS:
            # One stream per (split, scenario): changing one count leaves the others' content intact.
            rng = random.Random(f"mmscene-demo:{seed}:{split}:{scenario}")
            gen = Generator(rng, media_root, f"{split}/{scenario}", image_px, num_frames, option_order)
            items = _track(range(counts[split]), progress, f"demo {split}/{scenario}", total=counts[split])
            records[split] += [gen.sample(scenario, i, f"demo-{split}-{scenario}-{i:05d}") for i in items]
        _write_jsonl(raw / f"{split}.jsonl", records[split])
    t_generate = time.perf_counter() - start

    reports = {}
    for split in SPLITS:
        reports[split] = _convert_split(
            raw / f"{split}.jsonl", media_root, out / split, counts[split], progress
        )
        # Generated data has no defects: a skip here is a converter or generator bug, and a
        # quietly smaller demo set would skew the chance levels and per-scenario weights.
        written = reports[split].get("written", {})
        if _skipped_total(reports[split]) or written != {s: counts[split] for s in SCENARIOS}:
            raise RuntimeError(f"converting the demo {split} split lost samples: {reports[split]}")
    t_convert = time.perf_counter() - start - t_generate

    from mmscene.data.tools.local_tokenizer import save_tokenizer, train_tokenizer

    tokenizer = train_tokenizer(
        _tokenizer_corpus(records["train"] + records["val"]), vocab_size=TOKENIZER_VOCAB_SIZE
    )
    save_tokenizer(tokenizer, out / "tokenizer")

    summary = {
        "params": params,
        "counts": {split: _counts(records[split]) for split in SPLITS},
        "chance": _chance_levels(records["train"] + records["val"]),
        "shards": {
            split: {s: sorted(p.name for p in (out / split / s).glob("shard-*.tar")) for s in SCENARIOS}
            for split in SPLITS
        },
        "converter": reports,
        "tokenizer": {"path": "tokenizer", "vocab_size": len(tokenizer)},
        "seconds": {
            "generate": round(t_generate, 2),
            "convert": round(t_convert, 2),
            "total": round(time.perf_counter() - start, 2),
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    done.write_text(json.dumps(params) + "\n")  # last: its presence means every file above is complete
    return summary


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", required=True, type=Path, help="output folder (raw/, train/, val/, tokenizer/)"
    )
    parser.add_argument("--train-per-scenario", type=int, default=2000, help="training samples per scenario")
    parser.add_argument("--val-per-scenario", type=int, default=100, help="validation samples per scenario")
    parser.add_argument("--seed", type=int, default=0, help="the dataset is a pure function of this seed")
    parser.add_argument(
        "--option-order",
        choices=["fixed", "shuffled"],
        default="fixed",
        help="multiple-choice options in each task's fixed order, or shuffled per sample (harder)",
    )


def demo_main(args: argparse.Namespace) -> int:
    summary = make_demo(
        args.out,
        n_train_per_scenario=args.train_per_scenario,
        n_val_per_scenario=args.val_per_scenario,
        seed=args.seed,
        progress=getattr(args, "progress", True),
        option_order=args.option_order,
    )
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mmscene demo dataset: {args.out}")
    for col in ("split", "scenario", "task", "multi-choice", "open-ended", "chance MC", "chance open"):
        table.add_column(col)
    for split, by_scenario in summary["counts"].items():
        for scenario, by_task in by_scenario.items():
            for task, by_type in by_task.items():
                chance = summary["chance"][task]
                table.add_row(
                    split,
                    scenario,
                    task,
                    str(by_type.get("multi-choice", 0)),
                    str(by_type.get("open-ended", 0)),
                    f"{chance['multi-choice']:.3f}",
                    f"{chance['open-ended']:.3f}",
                )
    console = Console()
    console.print(table)
    console.print(
        f"shards in {args.out}/{{train,val}}/<scenario>/, tokenizer in {args.out}/tokenizer "
        f"(vocab {summary['tokenizer']['vocab_size']}); generated in {summary['seconds']['total']} s"
    )
    return 0  # make_demo raises on any lost sample


# ------------------------------------------------------------------------------------- plumbing
def _convert_split(annotations: Path, media_root: Path, out: Path, n: int, progress: bool) -> dict[str, Any]:
    from mmscene.data.ingest.convert import convert

    # About four shards per scenario, so that several dataloader workers / ranks each get one.
    shard_size = max(1, math.ceil(n / 4))
    rules = {name: task.scenario for name, task in TASKS.items()}
    return convert(
        annotations,
        media_root,
        out,
        scenario="auto",
        shard_size=shard_size,
        workers=1,
        dataset_rules=rules,
        progress=progress,
    )


def _skipped_total(report: Any) -> int:
    skipped = report.get("skipped", 0) if isinstance(report, dict) else 0
    if isinstance(skipped, dict):
        return sum(int(v) for v in skipped.values())
    if isinstance(skipped, list):
        return len(skipped)
    return int(skipped)


def _write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def _tokenizer_corpus(records: Iterable[dict[str, Any]]) -> list[str]:
    # Rendered as the ChatML turns the encoder will tokenize, so merges cover role headers too.
    return [
        render_chat(
            [
                {"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                for t in record["conversations"]
            ]
        )
        for record in records
    ]


def _counts(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, dict[str, int]]]:
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for record in records:
        meta = record["metadata"]
        scenario = TASKS[meta["dataset"]].scenario
        by_type = counts.setdefault(scenario, {}).setdefault(meta["dataset"], {})
        by_type[meta["question_type"]] = by_type.get(meta["question_type"], 0) + 1
    return counts


def _chance_levels(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Expected score of uniform guessing: 1/options per multi-choice sample, 1/classes open-ended."""
    guesses: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        meta = record["metadata"]
        task = TASKS[meta["dataset"]]
        n = len(meta["options"]) if meta["question_type"] == "multi-choice" else len(task.classes)
        guesses[task.name][meta["question_type"]].append(1.0 / n)
    chance = {}
    for name in TASKS:
        by_type = {qt: float(np.mean(v)) for qt, v in guesses[name].items()}
        all_values = [x for v in guesses[name].values() for x in v]
        chance[name] = {
            "multi-choice": round(by_type.get("multi-choice", 0.0), 4),
            "open-ended": round(by_type.get("open-ended", 0.0), 4),
            "overall": round(float(np.mean(all_values)) if all_values else 0.0, 4),
        }
    return chance


def _track(items: Iterable[Any], progress: bool, description: str, total: int) -> Iterable[Any]:
    if not progress:
        return items
    from rich.progress import track

    return track(items, description=description, total=total, transient=True)


__all__ = ["add_demo_arguments", "demo_main", "make_demo"]
