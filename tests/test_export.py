"""``mmscene export hf``: a training checkpoint becomes a directory transformers loads as Llava."""

import subprocess
import sys

import torch
from train_helpers import tiny_config, write_config
from transformers import AutoProcessor, LlavaForConditionalGeneration

from mmscene.data.demo import make_demo
from mmscene.export import load_module_from_checkpoint
from mmscene.train.cli import build_cli


def test_export_training_checkpoint_to_llava_hf(tmp_path):
    data = tmp_path / "demo"
    make_demo(data, n_train_per_scenario=4, n_val_per_scenario=2, progress=False)
    cfg = tiny_config(data, tmp_path / "run", max_steps=2)
    cfg["trainer"]["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "ck"), "save_last": True},
        }
    ]
    build_cli(["fit", "--config", str(write_config(cfg, tmp_path / "c.yaml"))])
    ckpt = tmp_path / "ck" / "last.ckpt"

    out = tmp_path / "hf"
    result = subprocess.run(
        [sys.executable, "-m", "mmscene.cli", "export", "hf", "--checkpoint", str(ckpt), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]

    module, _ = load_module_from_checkpoint(ckpt)
    ours = module.model.eval()
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == hf.config.image_token_index
    n = ours.tokens_per_image()
    ids = torch.tensor([[5, 6, 7] + [hf.config.image_token_index] * n + [8, 9, 10]])
    pixels = torch.randn(1, 3, ours.image_size, ours.image_size)
    with torch.no_grad():
        torch.testing.assert_close(
            hf(input_ids=ids, pixel_values=pixels).logits, ours(ids, pixels).logits, atol=1e-5, rtol=0
        )
