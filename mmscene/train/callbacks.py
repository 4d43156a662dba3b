"""Callbacks the module brings along."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch.distributed as dist


class WritePredictions(L.Callback):
    """Collects ``predict_step`` answers from every rank and writes them as JSONL (rank 0)."""

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self.rows: list[dict] = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.rows.extend(outputs or [])

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        rows = self.rows
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, rows)
            rows = [r for part in parts for r in part]
        if trainer.is_global_zero:
            path = Path(getattr(trainer.datamodule, "predict_output", "predictions.jsonl"))
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                for row in sorted(rows, key=lambda r: r["id"]):
                    f.write(json.dumps(row) + "\n")
            print(f"wrote {len(rows)} answers to {path}")
