"""Callbacks the module brings along."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L

from mmscene.train.ranks import concatenated, from_all_ranks


class WritePredictions(L.Callback):
    """Collects ``predict_step`` answers from every rank and writes them as JSONL (rank 0)."""

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self.rows: list[dict] = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.rows.extend(outputs or [])

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        rows = concatenated(self.rows)
        if trainer.is_global_zero:
            path = Path(getattr(trainer.datamodule, "predict_output", "predictions.jsonl"))
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                for row in sorted(rows, key=lambda r: r["id"]):
                    f.write(json.dumps(row) + "\n")
            print(f"wrote {len(rows)} answers to {path}")


def summed_over_ranks(counts: dict[str, int]) -> dict[str, int]:
    """``scenario/reason`` counts added up over all ranks (a collective: every rank calls it)."""
    total: dict[str, int] = {}
    for part in from_all_ranks(dict(counts)):
        for key, n in part.items():
            total[key] = total.get(key, 0) + n
    return total


def scenario_of(datamodule, stage: str) -> dict[str, str]:
    """Source name -> scenario, for the sources of a stage."""
    sources = getattr(datamodule, "sources", {}).get(stage, [])
    return {s.name: s.scenario for s in sources}


def by_scenario(counts: dict[str, int], scenarios: dict[str, str]) -> dict[str, int]:
    """``source/reason`` counts summed into ``scenario/reason``."""
    total: dict[str, int] = {}
    for key, n in counts.items():
        source, _, reason = key.partition("/")
        key = f"{scenarios.get(source, source)}/{reason}"
        total[key] = total.get(key, 0) + n
    return total


def print_skips(title: str, counts: dict[str, int], scenarios: dict[str, str] | None = None) -> None:
    """A table of skipped samples per source and reason (nothing when none were skipped)."""
    if not counts:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("source", "scenario", "reason", "samples"):
        table.add_column(column, justify="right" if column == "samples" else "left")
    for key, n in sorted(counts.items()):
        source, _, reason = key.partition("/")
        table.add_row(source, (scenarios or {}).get(source, source), reason, str(n))
    Console(stderr=True).print(table)


class SkipReport(L.Callback):
    """Training skips as metrics ``data/skipped/<scenario>/<reason>`` (summed over ranks and the
    scenario's sources, every ``log_every_n_steps`` steps) and, per source, as a table when
    training ends."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (
            batch_idx + 1
        ) % trainer.accumulate_grad_batches or trainer.global_step % trainer.log_every_n_steps:
            return
        counts = by_scenario(
            summed_over_ranks(_train_skips(trainer)), scenario_of(trainer.datamodule, "train")
        )
        if counts:
            pl_module.log_dict({f"data/skipped/{k}": float(v) for k, v in counts.items()}, sync_dist=False)

    def on_train_end(self, trainer, pl_module) -> None:
        counts = summed_over_ranks(_train_skips(trainer))
        if trainer.is_global_zero:
            print_skips(
                "skipped training samples (all ranks)", counts, scenario_of(trainer.datamodule, "train")
            )


def _train_skips(trainer) -> dict[str, int]:
    skipped = getattr(trainer.datamodule, "skipped", None)
    return skipped() if callable(skipped) else {}
