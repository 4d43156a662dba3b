"""Running lmms-eval tasks on an mmscene model and reading their scores back.

lmms-eval logs failures and carries on in places (a task it cannot find is dropped with a
warning); here every asked task must come back with scores, or :class:`EvaluationError` says
which did not.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import lmms_eval.evaluator as evaluator
from lmms_eval.tasks import TaskManager

from mmscene.eval.session import EvaluationError
from mmscene.eval.strict_pil import restore_strict_pil

restore_strict_pil()

log = logging.getLogger(__name__)


def find_tasks(tasks: list[str], include_path: list[str] | None = None) -> tuple[TaskManager, list[str]]:
    """lmms-eval's task index (its bundled tasks and ``include_path``'s YAMLs; building it reads
    them all, so callers keep it) and which of ``tasks`` it lacks."""
    manager = TaskManager(include_path=include_path or None)
    return manager, [t for t in tasks if t not in manager.all_tasks]


def run_tasks(
    lm,
    tasks: list[str],
    include_path: list[str] | None = None,
    limit: int | float | None = None,
    log_samples: bool = True,
    distributed: bool = False,
    manager: TaskManager | None = None,
) -> dict[str, Any] | None:
    """lmms-eval's ``simple_evaluate`` on ``lm``; rank 0 gets the results, other ranks ``None``.
    ``manager``: a task index from :func:`find_tasks` of the same tasks, reused."""
    if manager is None:
        manager, missing = find_tasks(tasks, include_path)
        if missing:
            raise EvaluationError(
                f"lmms-eval knows no task {missing} (include_path: {include_path or 'none'})"
            )
    if distributed:
        import torch.distributed as dist

        # lmms-eval reads the process layout from the environment (as torchrun sets it)
        os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
        os.environ.setdefault("RANK", str(dist.get_rank()))
    results = evaluator.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        limit=limit,
        log_samples=log_samples,
        task_manager=manager,
        distributed_executor_backend="torchrun" if distributed else "accelerate",
        bootstrap_iters=0,
    )
    if results is None:
        return None
    got = results.get("results", {})
    lost = [t for t in tasks if t not in got and t not in results.get("groups", {})]
    if lost:
        raise EvaluationError(f"lmms-eval returned no scores for {lost}")
    return results


def scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of the numeric results (lmms-eval's ``metric,filter`` keys
    become ``metric``, or ``metric/filter`` for filters other than ``none``)."""
    out: dict[str, dict[str, float]] = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            if "," not in key or "_stderr" in key or not isinstance(value, int | float):
                continue
            metric, filt = key.split(",", 1)
            out.setdefault(task, {})[metric if filt == "none" else f"{metric}/{filt}"] = float(value)
    return out


def write_results(results: dict[str, Any], out: Path) -> list[Path]:
    """``out/results.json`` (scores and task configs) and ``out/samples_<task>.jsonl`` (per sample:
    document id, target, answers, per-sample scores)."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json"]
    summary = {k: v for k, v in results.items() if k != "samples"}
    written[0].write_text(json.dumps(summary, indent=2, default=str))
    for task, rows in (results.get("samples") or {}).items():
        path = out / f"samples_{task}.jsonl"
        with path.open("w") as f:
            for row in rows:
                f.write(json.dumps(_sample_row(row), default=str) + "\n")
        written.append(path)
    return written


def _sample_row(row: dict[str, Any]) -> dict[str, Any]:
    keep = {k: v for k, v in row.items() if k not in ("doc", "arguments", "resps")}
    doc = row.get("doc") or {}
    keep["doc"] = {k: v for k, v in doc.items() if isinstance(v, str | int | float | bool) or v is None}
    return keep


def print_table(results: dict[str, Any], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="lmms-eval scores")
    for column in ("task", "metric", "value", "samples"):
        table.add_column(column, justify="right" if column in ("value", "samples") else "left")
    n = results.get("n-samples", {})
    for task, metrics in scores(results).items():
        count = n.get(task, {}).get("effective", "")
        for metric, value in metrics.items():
            table.add_row(task, metric, f"{value:.4f}", str(count))
    (console or Console()).print(table)
