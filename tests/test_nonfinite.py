"""A NaN/Inf loss stops the run naming its samples, or (``nonfinite_loss: skip``) skips the step."""

import lightning as L
import pytest
import torch
from train_helpers import tiny_config

from mmscene.train.datamodule import MMSceneDataModule
from mmscene.train.module import MMSceneModule


class PoisonStep(L.Callback):
    """NaN pixels in every micro-batch of optimizer step ``step``; weights seen before each step."""

    def __init__(self, step: int):
        self.step, self.keys, self.weights = step, [], {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights[trainer.global_step] = {
            k: v.detach().clone() for k, v in pl_module.model.state_dict().items()
        }
        if trainer.global_step == self.step:
            batch["pixel_values"].fill_(float("nan"))
            self.keys += [m["key"] for m in batch["meta"]]


def _fit(tmp_path, demo_data, mode: str, poison: PoisonStep) -> MMSceneModule:
    cfg = tiny_config(demo_data, tmp_path)
    m, d = cfg["model"], cfg["data"]
    module = MMSceneModule(model=m["model"], lr=m["lr"], nonfinite_loss=mode)
    dm = MMSceneDataModule(
        tokenizer=d["tokenizer"], train=d["train"], scenarios=d["scenarios"], batch_size=4, max_length=512
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[poison],
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=dm)
    return module


def test_nonfinite_loss_stops_naming_the_samples(tmp_path, demo_data):
    poison = PoisonStep(2)
    with pytest.raises(FloatingPointError, match="non-finite loss") as err:
        _fit(tmp_path, demo_data, "stop", poison)
    assert "at step 2" in str(err.value)
    assert poison.keys and all(key in str(err.value) for key in poison.keys)


def test_nonfinite_step_is_skipped(tmp_path, demo_data):
    poison = PoisonStep(2)
    module = _fit(tmp_path, demo_data, "skip", poison)
    assert module._nonfinite_steps == 1
    before, after = poison.weights[2], poison.weights[3]
    assert all(torch.equal(before[k], after[k]) for k in before)  # the poisoned step changed nothing
    assert any(not torch.equal(poison.weights[1][k], before[k]) for k in before)  # the others did train
    assert all(torch.isfinite(v).all() for v in module.model.state_dict().values())
