"""``mmscene eval``: lmms-eval tasks on a checkpoint, a score table, results and per-sample logs.

    mmscene eval --checkpoint CKPT_OR_DIR --tasks a,b [--include_path DIR] [--limit N] --out DIR

Exits 0 only when every task was scored; a failure (no such task, a request that cannot be
prepared, lmms-eval missing) prints its reason and exits non-zero.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="training .ckpt / sharded folder, or a model directory"
    )
    parser.add_argument("--tasks", required=True, help="comma-separated lmms-eval task (or group) names")
    parser.add_argument(
        "--include_path", "--include-path", dest="include_path", action="append", default=[],
        help="folder of local task YAMLs (repeatable)",
    )  # fmt: skip
    parser.add_argument("--limit", type=float, default=None, help="samples per task (a fraction if < 1)")
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for results.json and samples_<task>.jsonl"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="requests per generation batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint's)")
    parser.add_argument("--config", default=None, help="run config whose data: section sets the prompts")
    parser.add_argument(
        "--multi-view-tasks", default="", help="'|'-separated tasks whose images are views of one 3D scene"
    )


def eval_main(args: argparse.Namespace) -> int:
    try:
        from mmscene.eval.harness import print_table, run_tasks, write_results
        from mmscene.eval.lmms_model import MMSceneLMM
    except ImportError as err:
        print(
            f"mmscene eval: error: lmms-eval is not installed ({err}); pip install 'mmscene[eval]'",
            file=sys.stderr,
        )
        return 2
    from mmscene.eval.session import EvaluationError

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    try:
        lm = MMSceneLMM(
            pretrained=args.checkpoint,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
            tokenizer=args.tokenizer,
            config=args.config,
            multi_view_tasks=args.multi_view_tasks,
        )
        results = run_tasks(lm, tasks, include_path=args.include_path, limit=limit)
    except EvaluationError as err:
        print(f"mmscene eval: error: {err.code}", file=sys.stderr)
        return 1
    assert results is not None  # one process: rank 0
    written = write_results(results, args.out)
    print_table(results)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0
