"""``MMSceneTrainer``: Lightning's Trainer with crash-safe checkpoints and resume.

Why the Trainer and not a strategy or CheckpointIO: every save passes ``Trainer.save_checkpoint``
(``ModelCheckpoint``, ``SlurmRequeue``, Lightning's own SLURM handler, ``OnExceptionCheckpoint``),
whatever the strategy, while ``ModelParallelStrategy`` writes its distributed checkpoint without
any CheckpointIO. So one override makes single files and DCP folders atomic under every strategy,
including one given on the command line; configs need no change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

from mmscene.train import atomic
from mmscene.train.resume import ResumeConnector


class CrashSafeCheckpointIO(TorchCheckpointIO):
    """Single-file writes and removals for :class:`MMSceneTrainer`.

    ``save_checkpoint`` writes straight to the path it is given, which the trainer has made a
    temporary name (Lightning's ``_atomic_save`` would stage the whole checkpoint in memory and
    in the system's temp folder first). ``remove_checkpoint`` renames before deleting and accepts
    a missing path; every strategy removes through its CheckpointIO, FSDP2's included.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(str(path)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            torch.save(checkpoint, f)

    def remove_checkpoint(self, path) -> None:
        if not _is_local_file_protocol(str(path)):
            return super().remove_checkpoint(path)
        atomic.remove(Path(path))


class MMSceneTrainer(L.Trainer):
    """``lightning.Trainer`` whose checkpoints are written atomically and whose resume takes the
    newest complete checkpoint (:mod:`mmscene.train.resume`). Same arguments as the Trainer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._checkpoint_connector = ResumeConnector(self)
        if type(self.strategy.checkpoint_io) is TorchCheckpointIO:  # a user's own IO stays
            self.strategy.checkpoint_io = CrashSafeCheckpointIO()

    def save_checkpoint(
        self, filepath, weights_only: bool | None = None, storage_options: Any | None = None
    ) -> None:
        """Every rank writes its part under a temporary name beside ``filepath``; once all have
        (Lightning's save ends with a barrier), rank 0 renames it into place."""
        if not _is_local_file_protocol(str(filepath)):
            return super().save_checkpoint(filepath, weights_only, storage_options)
        names = None
        if self.is_global_zero:
            final = Path(filepath).absolute()
            final.parent.mkdir(parents=True, exist_ok=True)
            atomic.clean_leftovers(final.parent)
            names = (str(final), str(atomic.temporary(final, atomic.PARTIAL)))
        # One pair for all ranks, sent once rank 0 has cleaned up: no rank writes a shard into a
        # leftover that is still being deleted.
        final, partial = (Path(p) for p in self.strategy.broadcast(names, src=0))
        super().save_checkpoint(partial, weights_only, storage_options)
        self._publish(partial, final)

    def _publish(self, partial: Path, final: Path) -> None:
        if self.is_global_zero:
            atomic.publish(partial, final)
        self.strategy.barrier("mmscene.publish_checkpoint")
