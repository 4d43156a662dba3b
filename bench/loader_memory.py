"""Host memory of the training data loader over a long stream: does RSS stay flat?

Streams ``--samples`` samples of the demo dataset (the stream is endless, so its 4 x 100 samples
repeat) through exactly what ``mmscene fit --config configs/demo.yaml`` builds:
``MMSceneDataModule.train_dataloader()`` (``MixedBatches`` over the four scenario sources with the
config's plugin options, the real ``PromptEncoder`` with the demo model's image geometry,
``pad_collate``, a ``DataLoader`` with ``--workers`` workers and ``exit_with_parent``), and every
batch handed to the data module's ``on_before_batch_transfer`` as the trainer does, which keeps
the newest data state of each worker.

After the first batch and every ``--interval`` samples it prints the resident memory of the main
process and of each loader worker, read from ``/proc/<pid>/status`` (VmRSS) and summed, with the
summed PSS from ``/proc/<pid>/smaps_rollup`` beside it (RSS counts pages the forked workers still
share with the main process once per process; PSS splits them), and the pickled size of the data
state the batch carries (``_data_state``: every stream's shuffle buffer as restore keys). The baseline is
the first reading at or after ``--warmup`` samples; growth is the last reading minus that one,
in MiB and as a ratio. Samples/s are given over wall time and over CPU time (main process and
workers together).

Exit status 1 when the summed RSS grew by more than ``--max-growth-mib`` after warm-up.
``--tracemalloc`` also traces Python allocations in the main process and in every worker and
prints the largest growths between the baseline and the end (slow, and its own memory is part of
the RSS, so the growth is not checked then: a diagnosis, not a figure).

  python bench/loader_memory.py                        # 50k samples, 2 workers; generates the demo data
  python bench/loader_memory.py --data data/demo       # an existing `mmscene data demo --out` folder
  python bench/loader_memory.py --samples 400 --workers 1 --interval 100 --warmup 100   # smoke run
"""

from __future__ import annotations

import argparse
import os
import pickle
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

from demo_data import add_demo_data_arguments, demo_data

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------ /proc readings
def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the loader workers), found by their PPid in /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == pid:
            out.append(int(entry))
    return sorted(out)


def rss_pss(pid: int) -> tuple[int, int]:
    """Resident and proportional set size of one process, bytes."""
    rss = pss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
    except OSError:
        pss = 0
    return rss, pss


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def restore_keys(state: dict) -> int:
    """Shuffle-buffer restore keys in one slot's data state (the mixer's own buffer included)."""
    copies = [state["streams"], (state.get("buffer") or {}).get("streams", {})]
    return sum(len(s["buffer"]) for streams in copies for s in streams.values())


# ------------------------------------------------------------------------------ tracemalloc
_SNAP_DIR: str | None = None


def _dump_snapshot(signum, frame) -> None:  # runs in a worker on SIGUSR1
    path = Path(_SNAP_DIR) / f"{os.getpid()}-{time.monotonic_ns()}.snap"
    tracemalloc.take_snapshot().dump(str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)


def traced_worker_init(worker_id: int) -> None:
    from mmscene.train.datamodule import exit_with_parent

    exit_with_parent(worker_id)
    tracemalloc.start(8)
    signal.signal(signal.SIGUSR1, _dump_snapshot)


def worker_snapshots(pids: list[int], timeout: float = 120.0) -> dict[int, tracemalloc.Snapshot]:
    """Asks every worker for a snapshot (SIGUSR1) and waits for the files."""
    before = {p.name for p in Path(_SNAP_DIR).glob("*.snap")}
    for pid in pids:
        os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    found: dict[int, Path] = {}
    while len(found) < len(pids) and time.monotonic() < deadline:
        for p in Path(_SNAP_DIR).glob("*.snap"):
            if p.name not in before:
                found.setdefault(int(p.name.split("-")[0]), p)
        time.sleep(0.2)
    return {pid: tracemalloc.Snapshot.load(str(p)) for pid, p in found.items()}


def print_growth(label: str, first: tracemalloc.Snapshot, last: tracemalloc.Snapshot, top: int) -> None:
    skip = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen *")]
    a, b = first.filter_traces(skip), last.filter_traces(skip)
    total = sum(s.size for s in b.statistics("filename")) - sum(s.size for s in a.statistics("filename"))
    print(f"\ntracemalloc, {label}: traced Python memory {total / MIB:+.2f} MiB from baseline to end")
    for stat in b.compare_to(a, "traceback")[:top]:
        newest = list(reversed(stat.traceback))[:4]  # the allocating line first, then its callers
        frames = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in newest)
        print(f"  {stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks  {frames}")


# ------------------------------------------------------------------------------ setup
def build_datamodule(data: Path, config: Path, workers: int, batch_size: int | None, buffer: int | None):
    """The data module of ``config`` (its data and model sections) over ``data``, set up as for fit."""
    import yaml

    from mmscene.train.datamodule import MMSceneDataModule
    from mmscene.train.module import MMSceneModule

    cfg = yaml.safe_load(config.read_text())
    spec = dict(cfg["data"])
    spec.pop("val", None)  # training stream only
    spec.pop("test", None)

    def here(path: str) -> str:  # the config names data/demo/...; read the bench's folder instead
        return str(data / Path(path).relative_to("data/demo"))

    spec["tokenizer"] = here(spec["tokenizer"])
    spec["train"] = [{**s, "shards": here(s["shards"])} for s in spec["train"]]
    spec["num_workers"] = workers
    if batch_size is not None:
        spec["batch_size"] = batch_size
    if buffer is not None:
        spec["shuffle_buffer"] = buffer
    dm = MMSceneDataModule(**spec)
    module = MMSceneModule(**cfg["model"])  # only its config: the geometry (no weights are built)
    dm.trainer = SimpleNamespace(lightning_module=module, global_rank=0, world_size=1)
    dm.setup("fit")
    return dm


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_demo_data_arguments(parser)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--samples", type=int, default=50_000, help="samples to stream (default 50000)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    parser.add_argument("--batch-size", type=int, help="default: the config's (demo: 16)")
    parser.add_argument("--shuffle-buffer", type=int, help="default: the config's (data module: 1000)")
    parser.add_argument("--interval", type=int, default=5_000, help="samples between readings")
    parser.add_argument(
        "--warmup", type=int, default=5_000, help="samples before the baseline reading (default 5000)"
    )
    parser.add_argument(
        "--max-growth-mib",
        type=float,
        default=64.0,
        help="fail when summed RSS grows by more than this after warm-up (default 64)",
    )
    parser.add_argument("--tracemalloc", action="store_true", help="trace Python allocations (slow)")
    parser.add_argument("--top", type=int, default=12, help="tracemalloc lines per process")
    args = parser.parse_args()
    if args.samples < args.warmup + args.interval:
        parser.error("--samples must cover --warmup plus at least one --interval")

    data, tmp = demo_data(args)

    from mmscene.data.pipeline.mixer import STATE_KEY

    dm = build_datamodule(data, args.config, args.workers, args.batch_size, args.shuffle_buffer)
    loader = dm.train_dataloader()
    global _SNAP_DIR
    snap_tmp = None
    if args.tracemalloc:
        snap_tmp = tempfile.TemporaryDirectory(prefix="mmscene-tracemalloc-")
        _SNAP_DIR = snap_tmp.name
        loader.worker_init_fn = traced_worker_init  # exit_with_parent as before, plus tracing
        tracemalloc.start(8)
    me = os.getpid()
    print(
        f"data {data}; {len(dm.sources['train'])} sources ({', '.join(s.scenario for s in dm.sources['train'])}); "
        f"batch {dm.batch_size}; workers {args.workers}; shuffle buffer {dm.shuffle_buffer}; "
        f"images {dm.encoder.geometry.image_size} px, {dm.encoder.geometry.tokens_per_image} tokens; "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )
    print(
        "memory: VmRSS of the main process + every worker (/proc/<pid>/status), summed; "
        "PSS (/proc/<pid>/smaps_rollup) summed beside it"
    )

    head = "| samples | wall s | main RSS | workers RSS | total RSS | total PSS | data state |"
    print("\n" + head + "\n" + "|---" * 7 + "|")
    readings = []  # (samples, wall, rss, pss)
    state_sizes = []
    base = None  # (samples, wall, rss, cpu, snapshots)
    main_cpu0 = time.process_time()
    start = time.perf_counter()
    it = iter(loader)
    samples, next_read = 0, 0  # a first reading right after the first batch, then every interval
    workers: list[int] = []
    worker_cpu: dict[int, float] = {}
    while samples < args.samples:
        batch = next(it)
        samples += len(batch["meta"])
        if samples < next_read and samples < args.samples:
            dm.on_before_batch_transfer(batch, 0)
            continue
        next_read += args.interval
        state = len(pickle.dumps(batch[STATE_KEY], protocol=pickle.HIGHEST_PROTOCOL))
        state_sizes.append(state)
        keys = restore_keys(batch[STATE_KEY]["state"])
        dm.on_before_batch_transfer(batch, 0)  # as the trainer: keeps the slot's newest state
        del batch
        wall = time.perf_counter() - start
        workers = workers or children(me)
        sizes = {pid: rss_pss(pid) for pid in [me, *workers]}
        worker_cpu = {pid: cpu_seconds(pid) for pid in workers}
        cpu = time.process_time() - main_cpu0 + sum(worker_cpu.values())
        rss = sum(r for r, _ in sizes.values())
        pss = sum(p for _, p in sizes.values())
        readings.append((samples, wall, rss, pss))
        w_rss = " + ".join(f"{sizes[p][0] / MIB:.0f}" for p in workers)
        print(
            f"| {samples} | {wall:.1f} | {sizes[me][0] / MIB:.1f} MiB | {w_rss} MiB | "
            f"{rss / MIB:.1f} MiB | {pss / MIB:.1f} MiB | {state / 1024:.1f} KiB |",
            flush=True,
        )
        if base is None and samples >= args.warmup:
            snaps = None
            if args.tracemalloc:
                snaps = {"main": tracemalloc.take_snapshot(), **worker_snapshots(workers)}
            base = (samples, wall, rss, cpu, snaps)
    wall = time.perf_counter() - start
    cpu = time.process_time() - main_cpu0 + sum(worker_cpu.values())
    end_snaps = None
    if args.tracemalloc:
        end_snaps = {"main": tracemalloc.take_snapshot(), **worker_snapshots(workers)}
    del it  # shuts the workers down

    b_samples, b_wall, b_rss, b_cpu, b_snaps = base
    e_samples, _, e_rss, _ = readings[-1]
    growth = (e_rss - b_rss) / MIB
    after = e_samples - b_samples
    peak_state = max(state_sizes)
    print(
        f"\nsummed RSS {b_rss / MIB:.1f} MiB at {b_samples} samples (baseline, after warm-up) -> "
        f"{e_rss / MIB:.1f} MiB at {e_samples}: {growth:+.1f} MiB, {e_rss / b_rss:.3f}x "
        f"({growth * 1024 / max(1, after) * 1000:+.1f} KiB per 1000 samples)"
    )
    print(
        f"summed PSS {readings[[r[0] for r in readings].index(b_samples)][3] / MIB:.1f} -> "
        f"{readings[-1][3] / MIB:.1f} MiB"
    )
    print(
        f"data state per batch (pickled): {state_sizes[0] / 1024:.1f} KiB first reading, "
        f"{state_sizes[-1] / 1024:.1f} KiB last, {peak_state / 1024:.1f} KiB largest; the last holds "
        f"{keys} restore keys of buffered samples ({state_sizes[-1] / max(1, keys):.1f} bytes each), "
        f"at most streams x shuffle buffer ({len(dm.sources['train'])} x {dm.shuffle_buffer}) "
        f"per copy of the stream states"
    )
    print(
        f"throughput: {samples / wall:.1f} samples/s over {wall:.1f} s wall (from the first batch "
        f"request; {after / (readings[-1][1] - b_wall):.1f} after warm-up); "
        f"{samples / cpu:.1f} samples per CPU-second, {cpu * 1000 / samples:.2f} CPU ms per sample "
        f"(main + {len(workers)} workers; {(cpu - b_cpu) * 1000 / max(1, after):.2f} after warm-up)"
    )
    if args.tracemalloc and b_snaps and end_snaps:
        for who in b_snaps:
            if who in end_snaps:
                print_growth(
                    "main process" if who == "main" else f"worker {who}",
                    b_snaps[who],
                    end_snaps[who],
                    args.top,
                )
    if snap_tmp is not None:
        snap_tmp.cleanup()
    if tmp is not None:
        tmp.cleanup()
    if args.tracemalloc:  # the traces and snapshots live in the same processes' RSS
        print(f"RSS growth {growth:+.1f} MiB not checked: --tracemalloc's own memory is part of it")
        return 0
    if growth > args.max_growth_mib:
        print(
            f"FAIL: loader RSS (main + workers) grew by {growth:.1f} MiB after warm-up "
            f"(> --max-growth-mib {args.max_growth_mib:g}) over {after} samples",
            file=sys.stderr,
        )
        return 1
    print(f"OK: RSS growth after warm-up {growth:+.1f} MiB <= {args.max_growth_mib:g} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
