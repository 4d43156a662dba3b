"""A NaN/Inf loss stops the run naming its samples, or (``nonfinite_loss: skip``) skips the step."""

import lightning as L
import pytest
import torch
from train_helpers import fit_quietly, tiny_config

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
    m = cfg["model"]
    module = MMSceneModule(model=m["model"], lr=m["lr"], nonfinite_loss=mode)
    fit_quietly(module, cfg["data"], tmp_path, max_steps=4, accumulate_grad_batches=2, callbacks=[poison])
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
