"""``mmscene data convert``: LLaVA / M4-Instruct annotations -> WebDataset shards grouped by scenario.

The annotation file is streamed (:mod:`mmscene.data.ingest.annotations`: a ``.json`` top-level array
element by element, a ``.jsonl`` line by line, a Parquet file batch by batch); LLaVA-Interleave-Bench
rows are recognised per row (:mod:`mmscene.data.ingest.interleave_bench`). Each record is validated and its media read as original bytes, and the
good ones are written to ``OUT/<scenario>/shard-NNNNNN.tar``; the rest go to ``OUT/rejected.jsonl``
with a stable reason slug, and ``OUT/report.json`` counts both. See ``docs/data-format.md``.

With ``workers > 1`` the per-record work (validation, reading and decoding media) runs in a process
pool; results are consumed in order, so keys and shards are identical to a 1-worker run.

Records are written in a seeded random order by default: annotation files list each
sub-dataset's samples together, and shards written in that order would give loader workers long
runs of one sub-dataset. ``keep_order`` writes them as listed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ProcessPoolExecutor
from functools import partial
from pathlib import Path

from mmscene.data.ingest.annotations import (
    Item,
    annotation_format,
    iter_annotations,
    json_line,
    pyarrow_parquet,
    shuffled_annotations,
)
from mmscene.data.ingest.interleave_bench import LAYOUTS
from mmscene.data.ingest.records import AUTO, Prepared, RecordContext, ordered_rules, prepare
from mmscene.data.ingest.report import UNKNOWN_SCENARIO, ConvertReport
from mmscene.data.ingest.shard_writer import KeyAllocator, ShardWriter
from mmscene.data.shards import INDEX_NAME, SHARD_GLOB

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class _RejectLog:
    """``rejected.jsonl`` in annotation order whatever order records were converted in: lines go
    to a spill file first and are copied out sorted by index when the conversion ends."""

    def __init__(self, path: Path):
        self.path, self.spill = path, path.with_name(path.name + ".part")
        self.lines: list[tuple[int, int, int]] = []  # (index, start, length) in the spill file

    def __enter__(self) -> _RejectLog:
        self.f = self.spill.open("w+b")
        return self

    def write(self, index: int, entry: dict) -> None:
        data = json_line(entry, omit_bytes=True) + b"\n"
        self.lines.append((index, self.f.tell(), len(data)))
        self.f.write(data)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                with self.path.open("wb") as out:
                    for _, start, length in sorted(self.lines):
                        self.f.seek(start)
                        out.write(self.f.read(length))
        finally:
            self.f.close()
            self.spill.unlink(missing_ok=True)


def _ordered_map(fn: Callable[[Item], Prepared], items: Iterable[Item], pool: Executor | None, window: int):
    """``map(fn, items)`` in input order; with a pool, at most ``window`` records are in flight."""
    if pool is None:
        yield from map(fn, items)
        return
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def _check_name(name: str, what: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"{what} {name!r} must be letters, digits, '_' or '-' (it names a folder)")
    return name


def _previous_outputs(out: Path) -> list[Path]:
    return [
        *[p for p in (out / "report.json", out / "rejected.jsonl") if p.exists()],
        *sorted(out.glob(f"*/{SHARD_GLOB}")),
        *sorted(out.glob(f"*/{SHARD_GLOB}.part")),
        *sorted(out.glob(f"*/{INDEX_NAME}")),
    ]


def convert(
    annotations: Path | str,
    media_root: Path | str,
    out: Path | str,
    scenario: str = "auto",
    shard_size: int = 1000,
    workers: int = 1,
    dataset_rules: dict[str, str] | None = None,
    progress: bool = True,
    *,
    overwrite: bool = False,
    keep_order: bool = False,
    seed: int = 0,
    layout: str = AUTO,
) -> dict:
    """Convert an annotation file into ``OUT/<scenario>/shard-NNNNNN.tar``; returns the report.

    ``scenario="auto"`` infers each record's scenario (:func:`infer_scenario`), anything else forces
    it. ``dataset_rules`` maps a dataset-name pattern to a scenario, overriding the defaults.
    ``OUT`` must not already hold a conversion unless ``overwrite`` (then only the previous
    conversion's own files are removed). Also writes ``OUT/report.json`` and ``OUT/rejected.jsonl``.
    Records are written in an order shuffled with ``seed`` unless ``keep_order``. ``layout``:
    ``auto`` tells LLaVA-Interleave-Bench rows from LLaVA records row by row, ``llava`` /
    ``interleave-bench`` read every row as that layout. A Parquet file needs pyarrow.
    """
    annotations, media_root, out = Path(annotations), Path(media_root), Path(out)
    if not annotations.is_file():
        raise FileNotFoundError(f"annotation file {annotations} not found")
    if not media_root.is_dir():
        raise NotADirectoryError(f"media root {media_root} is not a directory")
    if scenario != AUTO:
        _check_name(scenario, "scenario")
    for pattern, target in (dataset_rules or {}).items():
        if not pattern:
            raise ValueError("empty dataset rule pattern")
        _check_name(target, f"scenario of rule {pattern!r}")
    if shard_size < 1 or workers < 1:
        raise ValueError(f"shard_size and workers must be >= 1 (got {shard_size}, {workers})")
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if annotation_format(annotations) == "parquet":
        pyarrow_parquet()  # fail before OUT is touched

    out.mkdir(parents=True, exist_ok=True)
    previous = _previous_outputs(out)
    if previous and not overwrite:
        raise FileExistsError(
            f"{out} already holds a conversion ({previous[0].name}, ...); use an empty folder or overwrite"
        )
    for path in previous:
        path.unlink()

    ctx = RecordContext(
        media_root=os.path.normpath(os.path.abspath(media_root)),
        scenario=scenario,
        rules=ordered_rules(dataset_rules),
        source_file=annotations.name,
        layout=layout,
    )
    report, keys = ConvertReport(), KeyAllocator()
    writers: dict[str, ShardWriter] = {}
    try:
        with contextlib.ExitStack() as stack:
            pool = None
            if workers > 1:
                pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers))
                # start (fork) the workers now, before rich starts its refresh thread
                pool.submit(int).result()
            bar = stack.enter_context(_progress_bar(progress))
            task = bar.add_task(
                "convert", total=annotations.stat().st_size, name=annotations.name, ok=0, bad=0
            )
            rejected = stack.enter_context(_RejectLog(out / "rejected.jsonl"))
            records = (
                iter_annotations(annotations)
                if keep_order
                else shuffled_annotations(annotations, out / ".records.part", seed)
            )
            results = _ordered_map(partial(prepare, ctx), records, pool, window=4 * workers)
            for res in results:
                if res.reason:
                    report.add_skipped(res.scenario, res.reason)
                    entry = {
                        "index": res.index,
                        "id": res.id,
                        "scenario": res.scenario or UNKNOWN_SCENARIO,
                        "reason": res.reason,
                        "detail": res.detail,
                        "record": res.raw,
                    }
                    rejected.write(res.index, entry)
                else:
                    assert res.scenario is not None and res.id is not None
                    writer = writers.get(res.scenario)
                    if writer is None:
                        writer = writers[res.scenario] = ShardWriter(out / res.scenario, shard_size)
                    writer.write(keys(res.id), res.members)
                    report.add_written(res.scenario, res.fixes)
                bar.update(
                    task,
                    completed=res.offset,
                    ok=sum(report.written.values()),
                    bad=sum(report.skipped.values()),
                )
            bar.update(task, completed=annotations.stat().st_size)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    shards = {
        name: [p.relative_to(out).as_posix() for p in writers[name].close()] for name in sorted(writers)
    }
    doc = report.as_dict(
        shards=shards,
        options={
            "annotations": annotations.name,
            "scenario": scenario,
            "shard_size": shard_size,
            "order": "annotations" if keep_order else f"shuffled (seed {seed})",
            "layout": layout,
            "rules": {k.lower(): v for k, v in (dataset_rules or {}).items()},
        },
    )
    tmp = out / "report.json.part"
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / "report.json")
    return doc


def _progress_bar(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("converting {task.fields[name]}"),
        BarColumn(),
        DownloadColumn(),
        TextColumn("[green]{task.fields[ok]} written[/] [red]{task.fields[bad]} rejected[/]"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


# -- command line --------------------------------------------------------------------------------
def parse_rule(text: str) -> tuple[str, str]:
    pattern, sep, scenario = text.partition("=")
    if not sep or not pattern.strip() or not scenario.strip():
        raise argparse.ArgumentTypeError(f"rule {text!r} is not DATASET=SCENARIO")
    return pattern.strip(), scenario.strip()


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``mmscene data convert``."""
    parser.add_argument(
        "annotations",
        metavar="ANNOTATIONS",
        type=Path,
        help="LLaVA / M4-Instruct annotations or LLaVA-Interleave-Bench rows: a .json array, .jsonl "
        "or .parquet (needs pyarrow)",
    )
    parser.add_argument(
        "--media-root", type=Path, required=True, help="folder the image / video / mesh paths are relative to"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder: OUT/<scenario>/shard-*.tar")
    parser.add_argument(
        "--scenario", default=AUTO, help="'auto' (infer per record) or a scenario name forced on every record"
    )
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--workers", type=int, default=1, help="processes that validate and read media")
    parser.add_argument(
        "--rule",
        action="append",
        type=parse_rule,
        default=[],
        metavar="DATASET=SCENARIO",
        help="records whose dataset / id / image path contains DATASET (any case) go to "
        "SCENARIO; repeatable, overrides the built-in 3D rules",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a previous conversion in OUT")
    parser.add_argument(
        "--keep-order",
        action="store_true",
        help="write records in annotation order (default: a seeded shuffle across shards)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the record shuffle (default 0)")
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default=AUTO,
        help="row layout: 'auto' (default) tells LLaVA-Interleave-Bench rows (sample_id, sub_task, "
        "question, answer, image_N) from LLaVA records per row",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument(
        "--tokenizer",
        help="also store each sample's token ids with this tokenizer (see `mmscene data tokenize`)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="with the tokenizer, system prompt and scenario options of this training config",
    )


def convert_main(args: argparse.Namespace) -> int:
    """Run the conversion from parsed arguments: 0 ok, 1 nothing usable, 2 bad input or options."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    rules = {}
    for rule in getattr(args, "rule", None) or []:
        pattern, scenario = parse_rule(rule) if isinstance(rule, str) else rule
        rules[pattern] = scenario
    try:
        report = convert(
            args.annotations,
            args.media_root,
            args.out,
            scenario=getattr(args, "scenario", AUTO),
            shard_size=getattr(args, "shard_size", 1000),
            workers=getattr(args, "workers", 1),
            dataset_rules=rules,
            progress=getattr(args, "progress", True),
            overwrite=getattr(args, "overwrite", False),
            keep_order=getattr(args, "keep_order", False),
            seed=getattr(args, "seed", 0),
            layout=getattr(args, "layout", AUTO),
        )
    except (OSError, ValueError, ImportError) as err:
        console.print(f"[red]error:[/] {err}")
        return 2
    table = Table(title=f"{report['total']} records -> {args.out}")
    table.add_column("scenario")
    table.add_column("written", justify="right")
    table.add_column("rejected", justify="right")
    for name in sorted(set(report["written"]) | set(report["skipped_by_scenario"])):
        bad = sum(report["skipped_by_scenario"].get(name, {}).values())
        table.add_row(name, str(report["written"].get(name, 0)), str(bad))
    console.print(table)
    if report["skipped"]:
        reasons = ", ".join(f"{reason} {n}" for reason, n in report["skipped"].items())
        console.print(f"rejected: {reasons} (see {Path(args.out) / 'rejected.jsonl'})")
    fixed = {k: v for k, v in report["fixed"].items() if v}
    if fixed:
        console.print("fixed: " + ", ".join(f"{k} {v}" for k, v in fixed.items()))
    if report["total"] and not report["written"]:
        console.print("[red]no record could be converted[/]")
        return 1
    return 0
