"""Lightning's SLURM auto-requeue with the work moved out of the signal handler.

``mmscene slurm`` adds :class:`SlurmRequeue` to the generated ``mmscene fit`` command. See
:mod:`mmscene.launch.slurm` and docs/slurm.md for the whole flow.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)


class SlurmRequeue(L.Callback):
    """Save Lightning's hpc checkpoint and requeue the SLURM job at a step boundary, not in a handler.

    Active only when Lightning runs under its ``SLURMEnvironment`` with ``auto_requeue`` (the
    default under ``srun``); it listens for that environment's ``requeue_signal``. Installed in
    ``setup``, before Lightning registers its own handler, which then stands aside.

    Args:
        check_every_n_steps: how often (in optimizer steps) the ranks agree on whether a signal
            arrived; each check is one one-element all-reduce.
    """

    def __init__(self, check_every_n_steps: int = 1):
        if check_every_n_steps < 1:
            raise ValueError("check_every_n_steps must be >= 1")
        self.check_every_n_steps = check_every_n_steps
        self._signum: signal.Signals | None = None
        self._previous: Any = None
        self._pid: int | None = None
        self.received = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if (
            stage != "fit"
            or self._signum is not None
            or threading.current_thread() is not threading.main_thread()
        ):
            return
        env = trainer._accelerator_connector.cluster_environment
        if not isinstance(env, SLURMEnvironment) or not env.auto_requeue or env.requeue_signal is None:
            return
        self._signum, self._pid, self.received = env.requeue_signal, os.getpid(), False
        self._previous = signal.signal(self._signum, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        # DataLoader workers are forked with this handler and SLURM signals them too: only the
        # training process itself takes note.
        if os.getpid() == self._pid:
            self.received = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._signum is None or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # not set up, or between micro-batches (their gradients are not in a checkpoint)
        if trainer.global_step % self.check_every_n_steps:
            return
        if trainer.strategy.reduce_boolean_decision(self.received, all=False):
            self.checkpoint_and_requeue(trainer)

    def checkpoint_and_requeue(self, trainer: L.Trainer) -> None:
        strategy = trainer.strategy
        # One path for all ranks: sharded (distributed) checkpoints are written by every rank.
        path = strategy.broadcast(
            trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir), src=0
        )
        rank_zero_log(trainer, f"requeue signal: saving {path} at step {trainer.global_step}")
        trainer.save_checkpoint(path)  # ends with a barrier: every rank has written its part
        requeued = False
        if trainer.is_global_zero:
            requeued = requeue_job()
        if strategy.broadcast(requeued, src=0):
            trainer.should_stop = True  # SLURM ends this run now; the requeued job resumes from `path`
        self.received = False

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._signum is not None and threading.current_thread() is threading.main_thread():
            signal.signal(self._signum, self._previous)
            self._signum = None


def rank_zero_log(trainer: L.Trainer, message: str) -> None:
    if trainer.is_global_zero:
        log.info("%s", message)


def requeue_job() -> bool:
    """``scontrol requeue`` this job (or array task); True when SLURM accepted it."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    if not re.fullmatch(r"[0-9_]+", job):
        raise ValueError(f"unexpected SLURM job id {job!r}")
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.error("could not run scontrol requeue %s: %s", job, err)
        return False
    if done.returncode != 0:
        log.error("scontrol requeue %s failed (%d): %s", job, done.returncode, done.stderr.strip())
        return False
    log.info("requeued SLURM job %s", job)
    return True
