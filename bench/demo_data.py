"""The demo dataset a data bench reads: a folder given with ``--data``, or one generated for the run."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def add_demo_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", type=Path, help="a `mmscene data demo` output folder (default: generate one)"
    )
    parser.add_argument("--samples-per-scenario", type=int, default=100, help="when generating (default 100)")


def demo_data(args: argparse.Namespace) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """``args.data``, or a freshly generated demo folder and the temporary directory holding it."""
    if args.data is not None:
        return args.data, None
    from mmscene.data.tools.demo import make_demo

    tmp = tempfile.TemporaryDirectory(prefix="mmscene-bench-")
    data = Path(tmp.name)
    t0 = time.perf_counter()
    make_demo(data, n_train_per_scenario=args.samples_per_scenario, n_val_per_scenario=1, progress=False)
    print(f"generated {4 * args.samples_per_scenario} demo samples in {time.perf_counter() - t0:.1f} s")
    return data, tmp
