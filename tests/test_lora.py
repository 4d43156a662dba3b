"""LoRA through peft: what trains, what a checkpoint holds, the merged export in transformers and
the unmerged adapter in peft."""

import csv
import subprocess
import sys

import pytest
import torch
from train_helpers import tiny_config, write_config

pytest.importorskip("peft")

from mmscene.model import load_pretrained  # noqa: E402
from mmscene.model.lora import LLM_TARGETS  # noqa: E402
from mmscene.train.checkpoint import load_module_from_checkpoint  # noqa: E402
from mmscene.train.cli import lightning_main  # noqa: E402

R = 4


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, demo_data, tiny_pretrained):
    """A short LoRA fit continuing from the tiny llava-hf checkpoint."""
    root = tmp_path_factory.mktemp("lora")
    cfg = tiny_config(demo_data, root / "run", max_steps=12)
    cfg["model"]["model"] = {"pretrained": str(tiny_pretrained)}
    cfg["model"]["freeze"] = ["vision"]
    cfg["model"]["lora"] = {"r": R, "alpha": 2 * R}
    cfg["model"].update(warmup_steps=0, lr={"projector": 1e-3, "llm": 1e-2})  # LoRA takes larger steps
    lightning_main(["fit", "--config", str(write_config(cfg, root / "c.yaml"))])
    (ckpt,) = (root / "run").rglob("last.ckpt")
    return root, ckpt


def _linear_shapes(model, names):
    return [
        m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in names
    ]


def test_only_adapters_and_projector_train_and_are_checkpointed(lora_run, tiny_pretrained):
    root, ckpt = lora_run
    module, saved = load_module_from_checkpoint(ckpt)
    trained = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    base = load_pretrained(tiny_pretrained)
    targets = _linear_shapes(base.language_model, LLM_TARGETS)
    adapters = sum(R * (m.in_features + m.out_features) for m in targets)
    projector = sum(p.numel() for p in base.projector.parameters())
    assert sum(p.numel() for p in trained.values()) == adapters + projector
    assert all(".lora_" in n or n.startswith("projector.") for n in trained)
    # the checkpoint holds exactly what trains: the base comes from `model.pretrained` again
    assert {k.removeprefix("model.") for k in saved["state_dict"]} == set(trained)
    # frozen base weights are the pretrained ones, adapters moved off their zero init
    ours = dict(module.model.named_parameters())
    for name, p in base.language_model.named_parameters():
        prefix, leaf = name.rsplit(".", 1)
        adapted = f"language_model.{prefix}.base_layer.{leaf}"
        torch.testing.assert_close(ours.get(adapted, ours.get(f"language_model.{name}")), p, rtol=0, atol=0)
    assert any(float(p.abs().sum()) > 0 for n, p in trained.items() if ".lora_B." in n)
    with open(next((root / "run").rglob("metrics.csv"))) as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses  # it learns


def _export(ckpt, out, *extra):
    cmd = [sys.executable, "-m", "mmscene.cli", "export", "hf", "--checkpoint", str(ckpt), "--out", str(out)]
    done = subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _inputs(model):
    ids = torch.tensor([[5, 6, 7] + [model.config.image_token_id] * model.tokens_per_image() + [8, 9, 10]])
    return ids, torch.randn(
        1, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(1)
    )


def test_merged_export_loads_in_transformers_with_the_adapted_logits(lora_run, tmp_path):
    from transformers import LlavaForConditionalGeneration

    _, ckpt = lora_run
    _export(ckpt, tmp_path / "hf", "--merge")
    assert not (tmp_path / "hf" / "llm_adapter").exists()
    ours = load_module_from_checkpoint(ckpt)[0].model.eval()  # adapters still apart
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ids, pixels = _inputs(ours)
    with torch.no_grad():
        torch.testing.assert_close(
            hf(input_ids=ids, pixel_values=pixels).logits, ours(ids, pixels).logits, atol=1e-5, rtol=0
        )


def test_unmerged_adapter_loads_with_peft(lora_run, tmp_path, tiny_pretrained):
    from peft import PeftModel

    _, ckpt = lora_run
    _export(ckpt, tmp_path / "hf")
    ours = load_module_from_checkpoint(ckpt)[0].model.eval()
    llm = load_pretrained(tiny_pretrained).language_model.eval()
    adapted = PeftModel.from_pretrained(llm, str(tmp_path / "hf" / "llm_adapter")).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, ours(ids).logits, atol=1e-5, rtol=0)
        with adapted.disable_adapter():  # and the adapters are what makes the difference
            assert not torch.allclose(adapted(input_ids=ids).logits, ours(ids).logits, atol=1e-4)


def test_bad_lora_options_are_refused():
    from mmscene.train.module import MMSceneModule

    with pytest.raises(ValueError, match="unknown keys"):
        MMSceneModule(lora={"rank": 4})
    with pytest.raises(ValueError, match="r must be"):
        MMSceneModule(lora={"r": 0})
