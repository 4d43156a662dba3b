"""``make demo``: build the demo data if missing, pre-tokenize its training shards, train the demo
config, show what was learned.

Prints a per-scenario table of the final validation scores next to chance, and writes a PNG
with the training loss and the per-scenario validation scores over steps.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()
# n-gram scores beyond unigrams are 0 for every one-word answer, right or wrong: they say nothing
# here (results.json still has them).
HIDDEN_METRICS = ("bleu_2", "bleu_3", "bleu_4")


def run(config: str, data: str, extra: list[str], **demo_kwargs) -> Path:
    from mmscene.data.tools.demo import make_demo
    from mmscene.train.cli import build_cli

    t0 = time.perf_counter()
    make_demo(data, **demo_kwargs)
    console.print(f"demo data ready in {data} ({time.perf_counter() - t0:.0f} s)")
    t0 = time.perf_counter()
    pretokenize(config, Path(data) / "train")
    console.print(f"training shards pre-tokenized for {config} ({time.perf_counter() - t0:.0f} s)")
    t1 = time.perf_counter()
    cli = build_cli(["fit", "--config", config, *extra])
    console.print(f"training + validation took {time.perf_counter() - t1:.0f} s")
    log_dir = Path(cli.trainer.log_dir)
    report(log_dir, Path(data))
    return log_dir


def pretokenize(config: str, train: Path) -> None:
    """``mmscene data tokenize TRAIN --config CONFIG`` (the demo's training folders, with the
    config's tokenizer and options): the loop then decodes media only."""
    from mmscene.data.tools.pretokenize import make_spec, print_reports, resolve_targets, tokenize_folders

    spec, _ = make_spec(config, str(train.parent / "tokenizer"))  # the demo data's own tokenizer
    reports = tokenize_folders(resolve_targets([str(train)], None), spec)
    if print_reports(reports):
        raise SystemExit("the demo shards are damaged: delete the demo data folder and run again")


def _last_scores(log_dir: Path) -> dict:
    lines = (log_dir / "results.json").read_text().strip().splitlines()
    return json.loads(lines[-1])


def report(log_dir: Path, data: Path) -> None:
    final = _last_scores(log_dir)
    scores = final["scores"]
    chance = json.loads((data / "summary.json").read_text()).get("chance", {})
    table = Table(title=f"validation at step {final['step']} ({log_dir})")
    for col in ("scenario", "task", "metric", "score", "chance"):
        table.add_column(col, justify="right" if col in ("score", "chance") else "left")
    for name, value in sorted(scores.items()):
        parts = name.split("/")
        if len(parts) != 3:
            continue
        scenario, task, metric = parts
        if metric in HIDDEN_METRICS:
            continue
        ref = chance.get(task, {}).get("multi-choice") if metric == "accuracy" else None
        table.add_row(scenario, task, metric, f"{value:.3f}", "" if ref is None else f"{ref:.3f}")
    for name, value in sorted(scores.items()):
        if name.endswith("overall"):
            table.add_row(name.split("/")[0] if "/" in name else "all", "", "overall", f"{value:.3f}", "")
    console.print(table)
    png = plot(log_dir)
    console.print(
        f"plot: {png}\nscores: {log_dir / 'results.json'}  predictions: {log_dir / 'predictions.jsonl'}"
    )


def plot(log_dir: Path) -> Path:
    """The loss (overall and per scenario) beside the validation scores and the telemetry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))

    def series(column: str) -> tuple[list[int], list[float]]:
        points = [(int(r["step"]), float(r[column])) for r in rows if r.get(column)]
        return tuple(map(list, zip(*points))) if points else ([], [])

    columns = list(rows[0]) if rows else []
    curves: dict[str, list[tuple[int, float]]] = {}
    for line in (log_dir / "results.json").read_text().splitlines():
        record = json.loads(line)
        for name, value in record["scores"].items():
            if name.endswith("/overall"):
                curves.setdefault(name.split("/")[0], []).append((record["step"], value))
    fig, ((loss_ax, score_ax), (speed_ax, grad_ax)) = plt.subplots(2, 2, figsize=(11, 8))
    loss_ax.plot(*series("train/loss"), label="all", color="black")
    for column in sorted(c for c in columns if c.startswith("train/loss/")):
        loss_ax.plot(*series(column), label=column.removeprefix("train/loss/"), alpha=0.7)
    loss_ax.set(title="training loss", xlabel="step", ylabel="loss")
    loss_ax.legend()
    for scenario, points in sorted(curves.items()):
        score_ax.plot(*zip(*points), marker="o", label=scenario)
    score_ax.set(title="validation score per scenario", xlabel="step", ylabel="score", ylim=(0, 1.02))
    score_ax.legend()
    speed_ax.plot(*series("train/tokens_per_s"), color="tab:blue")
    speed_ax.set(title="throughput and MFU (CPU: of the measured matmul rate)", xlabel="step")
    speed_ax.set_ylabel("tokens/s", color="tab:blue")
    mfu_ax = speed_ax.twinx()
    for column, style in (("train/mfu_lm", "--"), ("train/mfu_with_vit", ":")):
        mfu_ax.plot(*series(column), style, color="tab:red", label=column.removeprefix("train/"))
    mfu_ax.set_ylabel("MFU", color="tab:red")
    mfu_ax.legend(loc="lower right")
    grad_ax.plot(*series("train/grad_norm"), color="tab:green")
    grad_ax.set(title="gradient norm (before clipping) and learning rate", xlabel="step")
    grad_ax.set_ylabel("grad norm", color="tab:green")
    lr_ax = grad_ax.twinx()
    for column in sorted(c for c in columns if c.startswith("train/lr/")):
        lr_ax.plot(*series(column), "--", label=column.removeprefix("train/lr/"))
    lr_ax.set_ylabel("learning rate")
    if any(c.startswith("train/lr/") for c in columns):
        lr_ax.legend(loc="upper right")
    fig.tight_layout()
    out = log_dir / "demo.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--data", default="data/demo")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("MMSCENE_DEMO_THREADS", "1")))
    parser.add_argument(
        "--train-per-scenario", type=int, default=None, help="demo data size (default: make_demo's)"
    )
    parser.add_argument("--val-per-scenario", type=int, default=None)
    args, extra = parser.parse_known_args()
    # One intra-op thread for the trainer and one for each loader worker (torch sets 1 in its
    # workers; the env vars also cover numpy/OpenBLAS in the 3D renderer): with 2 cores, the
    # trainer's thread and the worker each keep a core, and a competing process slows a run in
    # proportion instead of stalling the trainer's thread barrier every op.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    sizes = {"n_train_per_scenario": args.train_per_scenario, "n_val_per_scenario": args.val_per_scenario}
    run(args.config, args.data, extra, **{k: v for k, v in sizes.items() if v is not None})


if __name__ == "__main__":
    main()
