"""Lightning's SLURM auto-requeue with the work moved out of the signal handler.

``mmscene slurm`` adds :class:`SlurmRequeue` to the generated ``mmscene fit`` command. See
:mod:`mmscene.launch.slurm` and docs/slurm.md for the whole flow.

Where the signal is acted on (the ranks agree with one one-element all-reduce per check):

* after an optimizer step (every ``check_every_n_steps``): save and stop, unless a validation
  is due right after this step; then the save happens when that validation starts;
* every ``check_every_n_val_batches`` validation batches, and at the end of a validation: the
  training state is at the optimizer-step boundary the validation follows, so the checkpoint is
  the same as one saved after that step.

A checkpoint saved before or during a validation marks that validation as not run: the resumed
run runs it again, from its first batch, at the saved step (Lightning's "restarted mid
evaluation" path), then trains on. One saved at the end of a validation resumes without
repeating it. After a successful ``scontrol requeue`` the run ends at once through
:class:`RequeueExit`: no further validation, no epoch-end or train-end checkpoint that SLURM would
cut off halfway.
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
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.states import TrainerFn

try:  # Lightning's exit for callbacks that end fit early (its tuner callbacks raise it)
    from lightning.pytorch.utilities.exceptions import _TunerExitException as _CleanExit
except ImportError:  # pragma: no cover - a Lightning without it: end as on SIGTERM (SystemExit(0))
    from lightning.pytorch.utilities.exceptions import SIGTERMException as _CleanExit

log = logging.getLogger(__name__)

_VAL_PROGRESS = "epoch_loop.val_loop.batch_progress"


class RequeueExit(_CleanExit):
    """Ends ``Trainer.fit`` once the hpc checkpoint is written and SLURM took the requeue.

    Lightning 2.6 handles it in ``_call_and_handle_interrupt`` as it does its tuner's early exit:
    teardown hooks run, loggers are finalised, the trainer's status is ``FINISHED`` and ``fit``
    returns normally, so the process exits with status 0. Nothing else runs: no rest of the
    validation, no ``on_validation_epoch_end`` with partial results, no ``last.ckpt``.
    """


class SlurmRequeue(L.Callback):
    """Save Lightning's hpc checkpoint and requeue the SLURM job at a step boundary, not in a handler.

    Active only when Lightning runs under its ``SLURMEnvironment`` with ``auto_requeue`` (the
    default under ``srun``); it listens for that environment's ``requeue_signal``. Installed in
    ``setup``, before Lightning registers its own handler, which then stands aside.

    Args:
        check_every_n_steps: how often (in optimizer steps) the ranks agree on whether a signal
            arrived; each check is one one-element all-reduce.
        check_every_n_val_batches: the same during validation, in validation batches.
    """

    def __init__(self, check_every_n_steps: int = 1, check_every_n_val_batches: int = 1):
        if check_every_n_steps < 1 or check_every_n_val_batches < 1:
            raise ValueError("check_every_n_steps and check_every_n_val_batches must be >= 1")
        self.check_every_n_steps = check_every_n_steps
        self.check_every_n_val_batches = check_every_n_val_batches
        self._signum: signal.Signals | None = None
        self._previous: Any = None
        self._pid: int | None = None
        self._pending = False  # agreed after a step that a validation follows: save when it starts
        self._unfinished_validation = False  # the checkpoint being written marks it so
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
        self._pending = False
        self._previous = signal.signal(self._signum, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        # DataLoader workers are forked with this handler and SLURM signals them too: only the
        # training process itself takes note.
        if os.getpid() == self._pid:
            self.received = True

    def _active(self, trainer: L.Trainer) -> bool:
        return (
            self._signum is not None and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        )

    def _agree(self, trainer: L.Trainer) -> bool:
        return bool(trainer.strategy.reduce_boolean_decision(self.received, all=False))

    # ------------------------------------------------------------------ training
    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self._active(trainer) or not at_step_boundary(trainer):
            return  # between micro-batches: their gradients are not in a checkpoint
        if self._pending:  # the validation this save waited for did not start (e.g. no batches)
            self.checkpoint_and_requeue(trainer)
        elif trainer.global_step % self.check_every_n_steps == 0 and self._agree(trainer):
            if validation_follows(trainer):
                self._pending = True  # save as it starts, so that the resumed run runs it
            else:
                self.checkpoint_and_requeue(trainer)

    # ------------------------------------------------------------------ validation (in fit)
    def on_validation_start(self, trainer: L.Trainer, pl_module) -> None:
        if not self._active(trainer):
            return
        val_loop = trainer.fit_loop.epoch_loop.val_loop
        if val_loop.restarting:
            # Running again a validation that a requeue interrupted: its saved progress counted
            # one batch in flight (how Lightning recognises "mid evaluation"); drop it so that
            # later checkpoints do not look interrupted too.
            total = val_loop.batch_progress.total
            total.ready = total.started = total.processed = total.completed
        if self._pending:
            self.checkpoint_and_requeue(trainer, unfinished_validation=True)

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self._active(trainer) or (batch_idx + 1) % self.check_every_n_val_batches:
            return
        if trainer.fit_loop.epoch_loop.val_loop.batch_progress.is_last_batch:
            return  # let it finish and publish; on_validation_end checks next
        if at_step_boundary(trainer) and self._agree(trainer):
            self.checkpoint_and_requeue(trainer, unfinished_validation=True)

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if self._active(trainer) and at_step_boundary(trainer) and self._agree(trainer):
            self.checkpoint_and_requeue(trainer)  # complete: the resumed run does not repeat it

    # ------------------------------------------------------------------ save, requeue, stop
    def checkpoint_and_requeue(self, trainer: L.Trainer, unfinished_validation: bool = False) -> None:
        strategy = trainer.strategy
        self._pending = False
        # One path for all ranks: sharded (distributed) checkpoints are written by every rank.
        path = strategy.broadcast(
            trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir), src=0
        )
        where = " (validation interrupted: the resumed run runs it again)" if unfinished_validation else ""
        rank_zero_log(trainer, f"requeue signal: saving {path} at step {trainer.global_step}{where}")
        self._unfinished_validation = unfinished_validation
        try:
            with torch.inference_mode(False):  # validation runs under inference mode
                trainer.save_checkpoint(path)  # ends with a barrier: every rank has written its part
        finally:
            self._unfinished_validation = False
        requeued = False
        if trainer.is_global_zero:
            requeued = requeue_job()
        self.received = False
        if strategy.broadcast(requeued, src=0):
            # SLURM ends this job now and starts it again, resuming from `path`: stop here.
            trainer.should_stop = True
            trainer.training = True  # Lightning's teardown then closes the training loader too
            raise RequeueExit(f"requeued after saving {path}")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self._unfinished_validation:
            mark_validation_unfinished(checkpoint)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._signum is not None and threading.current_thread() is threading.main_thread():
            if self._previous is not None:
                signal.signal(self._signum, self._previous)
            # After RequeueExit Lightning restores the handlers it found when fit started (this
            # one) only after the teardown hooks: have it restore the one before instead.
            found = getattr(getattr(trainer, "_signal_connector", None), "_original_handlers", None)
            if isinstance(found, dict) and found.get(self._signum) == self._note:
                found[self._signum] = self._previous
            self._signum = None


def at_step_boundary(trainer: L.Trainer) -> bool:
    """Whether the last training batch ended with an optimizer step (no gradients accumulated)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    should_accumulate = getattr(epoch_loop, "_should_accumulate", None)
    if should_accumulate is not None:
        return not should_accumulate()
    return epoch_loop.batch_progress.current.ready % trainer.accumulate_grad_batches == 0


def validation_follows(trainer: L.Trainer) -> bool:
    """Whether Lightning runs a validation right after the training batch that just ended."""
    epoch_loop = trainer.fit_loop.epoch_loop
    should_check = getattr(epoch_loop, "_should_check_val_fx", None)
    fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
    if should_check is None or fetcher is None:
        return False  # then the save happens at this step and the due validation is skipped
    try:
        return bool(should_check(fetcher))
    except Exception:  # noqa: BLE001 - a Lightning whose internals differ: save now instead
        return False


def mark_validation_unfinished(checkpoint: dict[str, Any]) -> None:
    """Make the checkpoint's validation progress read "mid evaluation, no batch done".

    Lightning (``_TrainingEpochLoop.advance`` / ``_EvaluationLoop.update_restart_stage``) then
    re-runs that validation on resume before the next training batch, from its first batch
    (mmscene's evaluation loaders are not resumable mid-way), instead of skipping it.
    """
    progress = checkpoint["loops"]["fit_loop"][_VAL_PROGRESS]
    before = progress["total"]["completed"] - progress["current"]["completed"]  # earlier validations
    progress["total"] = {"ready": before + 1, "started": before + 1, "processed": before, "completed": before}
    progress["current"] = {"ready": 1, "started": 1, "processed": 0, "completed": 0}
    progress["is_last_batch"] = False


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
