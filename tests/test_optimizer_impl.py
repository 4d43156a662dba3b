"""AdamW's implementation is a speed choice only: each trains the same weights."""

import pytest
import torch
from train_helpers import fit_quietly, tiny_config

from mmscene.train.module import MMSceneModule


def _fit(tmp_path, demo_data, impl: str) -> tuple[MMSceneModule, torch.optim.Optimizer]:
    cfg = tiny_config(demo_data, tmp_path)
    m = cfg["model"]
    torch.manual_seed(0)
    module = MMSceneModule(model=m["model"], freeze=[], lr=m["lr"], weight_decay=0.1, optimizer_impl=impl)
    trainer = fit_quietly(
        module, cfg["data"], tmp_path / impl, max_steps=3, accumulate_grad_batches=2, gradient_clip_val=1.0
    )
    return module, trainer.optimizers[0]


def test_every_adamw_implementation_trains_the_same_weights(tmp_path, demo_data):
    runs = {impl: _fit(tmp_path, demo_data, impl) for impl in ("auto", "for-loop", "foreach")}
    auto, loop, foreach = (runs[k][1].defaults for k in ("auto", "for-loop", "foreach"))
    assert (
        auto["fused"] is True
        and not loop["fused"]
        and loop["foreach"] is False
        and foreach["foreach"] is True
    )
    reference = runs["for-loop"][0].model.state_dict()
    start = MMSceneModule(model=tiny_config(demo_data, tmp_path)["model"]["model"])
    torch.manual_seed(0)
    start.configure_model()
    moved = [k for k, v in start.model.state_dict().items() if not torch.equal(v, reference[k])]
    assert len(moved) >= 0.9 * len(reference)  # three steps changed the weights, the tower's too
    for impl in ("auto", "foreach"):
        for name, value in runs[impl][0].model.state_dict().items():
            torch.testing.assert_close(value, reference[name], atol=1e-6, rtol=1e-5, msg=f"{impl}: {name}")


def test_an_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="optimizer_impl: 'apex' is not one of"):
        MMSceneModule(optimizer_impl="apex")


def test_mixed_precision_with_clipping_steps_an_unfused_adamw(tmp_path, demo_data):
    """Lightning's AMP refuses to clip a fused optimizer's gradients: ``auto`` does not fuse there
    (the 0.5B recipe: DDP, bf16-mixed, clipping), and an explicit ``fused`` is refused by name."""
    cfg = tiny_config(demo_data, tmp_path)
    amp = dict(max_steps=2, precision="bf16-mixed", gradient_clip_val=1.0)
    module = MMSceneModule(model=cfg["model"]["model"], lr=cfg["model"]["lr"])
    trainer = fit_quietly(module, cfg["data"], tmp_path / "auto", **amp)
    assert trainer.global_step == 2 and not trainer.optimizers[0].defaults["fused"]
    module = MMSceneModule(model=cfg["model"]["model"], lr=cfg["model"]["lr"], optimizer_impl="fused")
    with pytest.raises(
        ValueError, match="optimizer_impl: fused cannot clip gradients under trainer.precision"
    ):
        fit_quietly(module, cfg["data"], tmp_path / "fused", **amp)
