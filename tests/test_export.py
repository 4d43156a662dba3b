"""``mmscene export hf``: a training checkpoint becomes a directory transformers loads as Llava."""

from train_helpers import export_hf_and_compare, tiny_config, write_config
from transformers import AutoProcessor

from mmscene.data.tools.demo import make_demo
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

    hf = export_hf_and_compare(ckpt, tmp_path / "hf")
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == hf.config.image_token_index


def test_export_follows_the_runs_preprocessing_and_refuses_frame_pooling(tmp_path):
    """A run without padding and with pooled video frames: the export refuses until pooling is
    dropped on request, and its processor then gives the pixels the run's data module gave."""
    import json
    import subprocess
    import sys

    import torch
    from PIL import Image
    from transformers import LlavaProcessor

    from mmscene.data.pipeline.encode import ImageGeometry, PromptEncoder
    from mmscene.scenario import Prompt
    from mmscene.train.checkpoint import load_module_from_checkpoint

    data = tmp_path / "demo"
    make_demo(data, n_train_per_scenario=2, n_val_per_scenario=1, progress=False)
    cfg = tiny_config(data, tmp_path / "run", max_steps=1)
    cfg["model"]["model"]["config"]["frame_pool_stride"] = 2
    cfg["data"]["pad_to_square"] = False
    cfg["trainer"]["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "ck"), "save_last": True},
        }
    ]
    build_cli(["fit", "--config", str(write_config(cfg, tmp_path / "c.yaml"))])
    ckpt = tmp_path / "ck" / "last.ckpt"

    def export(*extra):
        cmd = [sys.executable, "-m", "mmscene.cli", "export", "hf", "--checkpoint", str(ckpt), "--out"]
        return subprocess.run(
            [*cmd, str(tmp_path / "hf"), *extra], capture_output=True, text=True, timeout=300
        )

    refused = export()
    assert refused.returncode == 2
    assert "frame_pool_stride=2" in refused.stderr and "--drop-frame-pooling" in refused.stderr
    assert "Traceback" not in refused.stderr
    done = export("--drop-frame-pooling")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WITHOUT FRAME POOLING" in done.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["mmscene_dropped_frame_pool_stride"] == 2

    module, _ = load_module_from_checkpoint(ckpt)
    processor = LlavaProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    assert processor.image_processor.do_pad is False
    image = Image.open(next((data / "raw" / "media").rglob("*.png"))).convert("RGB").resize((70, 40))
    prompt = Prompt(
        "k", "single_image", "t", [{"role": "user", "content": "<image>\nWhat?"}], [image], [False]
    )
    encoder = PromptEncoder(processor.tokenizer, ImageGeometry.of(module.model, pad_to_square=False))
    ours = encoder.encode_for_generation(prompt)["pixel_values"]
    theirs = processor(text="<image>", images=[image], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
