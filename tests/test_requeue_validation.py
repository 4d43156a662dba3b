"""``SlurmRequeue`` under real timing: the signal arrives during (or right before) a validation.

A tiny deterministic run under a faked SLURM (environment variables and a ``scontrol`` that only
records its arguments) is signalled at chosen points, resumed the way a requeued job resumes
(``Trainer.fit`` finds ``hpc_ckpt_1.ckpt``), and compared with the same run uninterrupted: the
same training steps, the same completed validations at the same steps, the same weights.
"""

from __future__ import annotations

import os
import signal

import lightning as L
import pytest
import torch
from lightning.pytorch.trainer.states import TrainerStatus
from torch.utils.data import DataLoader

from mmscene.launch.requeue import SlurmRequeue

VAL_BATCHES = 6
ACCUMULATE = 2
VAL_EVERY = 4 * ACCUMULATE  # batches: a validation after every 4th optimizer step
MAX_STEPS = 14


class StepModel(L.LightningModule):
    """Inputs depend on the optimizer step and micro-batch, so a repeated or skipped step shows in
    the weights; AdamW and a step-wise LR schedule make the optimizer state matter too."""

    def __init__(self, signal_at: tuple[str, int, int] | None = None):
        super().__init__()
        torch.manual_seed(0)  # every run starts from the same weights
        self.layer = torch.nn.Linear(4, 1)
        self.signal_at = signal_at  # (hook, global step, batch index)
        self.events: list[tuple] = []

    def _maybe_signal(self, where: str, batch_idx: int) -> None:
        if self.signal_at == (where, self.global_step, batch_idx) and not self.trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGUSR1)  # arrives mid-step, as SLURM's would

    def training_step(self, batch, batch_idx):
        loop = self.trainer.fit_loop.epoch_loop
        self.events.append(("train", self.global_step, batch_idx % ACCUMULATE, loop._batches_that_stepped))
        x = torch.arange(4.0) * (1 + self.global_step % 5) + batch_idx % ACCUMULATE
        loss = (self.layer(x) - 1.0).pow(2).sum()
        self._maybe_signal("train", batch_idx % ACCUMULATE)
        return loss

    def validation_step(self, batch, batch_idx):
        self.events.append(("val", self.global_step, batch_idx))
        self._maybe_signal("val", batch_idx)

    def on_validation_epoch_end(self):
        seen = [e for e in self.events if e[0] == "val" and e[1] == self.global_step]
        self.events.append(("val_end", self.global_step, len(seen)))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        return DataLoader(torch.zeros(1000, 1), batch_size=1)

    def val_dataloader(self):
        return DataLoader(torch.zeros(VAL_BATCHES, 1), batch_size=1)


def _fit(root, model: StepModel) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=MAX_STEPS,
        accumulate_grad_batches=ACCUMULATE,
        val_check_interval=VAL_EVERY,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        default_root_dir=root,
        callbacks=[SlurmRequeue()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    return trainer


def _validations(events) -> list[tuple[int, int]]:
    return [(step, n) for kind, step, n in (e[:3] for e in events) if kind == "val_end"]


def _trained(events) -> list[tuple]:
    return [e for e in events if e[0] == "train"]


# (where the signal arrives, the step it is saved at, validation batches run before stopping,
#  whether the resumed run runs the validation of that step)
CASES = {
    # during validation batch 2 of 6: the check after it saves and stops
    "mid-validation": (("val", 8, 2), 8, 3, True),
    # during the step that a validation follows: saved as that validation starts, none run
    "before-validation": (("train", 7, 1), 8, 0, True),
    # during the last validation batch: the validation finishes (and publishes), then the save
    "last-validation-batch": (("val", 8, VAL_BATCHES - 1), 8, VAL_BATCHES, False),
    # during a step with no validation after it: saved after that step
    "training": (("train", 5, 1), 6, 0, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_signal_around_validation_saves_stops_and_resumes_exactly(tmp_path, fake_slurm, case):
    signal_at, saved_step, val_batches_before_stop, reruns = CASES[case]
    reference = StepModel()
    _fit(tmp_path / "reference", reference)
    assert _validations(reference.events) == [(4, VAL_BATCHES), (8, VAL_BATCHES), (12, VAL_BATCHES)]

    root = tmp_path / "run"
    first = StepModel(signal_at=signal_at)
    before = signal.getsignal(signal.SIGUSR1)
    trainer = _fit(root, first)  # returns normally
    assert trainer.state.status == TrainerStatus.FINISHED
    assert signal.getsignal(signal.SIGUSR1) == before  # handler restored
    assert fake_slurm.read_text().split() == ["requeue", "4242"]
    assert trainer.global_step == saved_step
    ckpt = torch.load(root / "hpc_ckpt_1.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == saved_step
    # stopped at once: no training after the save, the validation cut short and not published
    assert max(e[1] for e in _trained(first.events)) == saved_step - 1
    ran = [e for e in first.events if e[0] == "val" and e[1] == saved_step]
    assert len(ran) == val_batches_before_stop
    done_first = _validations(first.events)
    assert done_first == [v for v in _validations(reference.events) if v[0] < saved_step] + (
        [] if reruns or val_batches_before_stop == 0 else [(saved_step, VAL_BATCHES)]
    )

    second = StepModel()
    resumed = _fit(root, second)  # finds hpc_ckpt_1.ckpt like the requeued job
    assert resumed.global_step == MAX_STEPS
    assert _trained(second.events)[0][1] == saved_step  # continues from the saved step
    done_second = _validations(second.events)
    assert (done_second[0] == (saved_step, VAL_BATCHES)) is reruns
    # together, exactly the uninterrupted run: steps, completed validations, logging steps, weights
    assert _trained(first.events) + _trained(second.events) == _trained(reference.events)
    assert done_first + done_second == _validations(reference.events)
    for got, want in zip(second.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_checkpoint_after_a_rerun_validation_resumes_plainly(tmp_path, fake_slurm):
    """The rerun drops the in-flight batch its saved progress counted: a later hpc checkpoint
    resumes like any other (no second rerun of a validation that completed)."""
    root = tmp_path / "run"
    _fit(root, StepModel(signal_at=("val", 4, 1)))  # hpc_ckpt_1 at step 4, mid-validation
    _fit(root, StepModel(signal_at=("val", 8, VAL_BATCHES - 1)))  # reruns 4; hpc_ckpt_2 after val 8
    assert (root / "hpc_ckpt_2.ckpt").is_file()
    ckpt = torch.load(root / "hpc_ckpt_2.ckpt", weights_only=False, map_location="cpu")
    total = ckpt["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]["total"]
    assert len(set(total.values())) == 1, total
    third = StepModel()
    _fit(root, third)
    assert _validations(third.events) == [(12, VAL_BATCHES)]
    assert _trained(third.events)[0][1] == 8
