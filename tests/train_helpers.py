"""Tiny training configs and callbacks shared by the training tests (also used in subprocesses)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import yaml

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(data: Path, root: Path, **trainer) -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    text = cfg["model"]["model"]["config"]["text"]
    vision = cfg["model"]["model"]["config"]["vision"]
    text.update(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    vision.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    d = cfg["data"]
    d["tokenizer"] = str(data / "tokenizer")
    for split in ("train", "val"):
        for source in d[split]:
            source["shards"] = str(data / split / source["scenario"])
    d.update(batch_size=4, eval_batch_size=8, num_workers=2)
    d["scenarios"]["3d"] = {"num_views": 2, "view_size": 32}
    d["scenarios"]["video"] = {"num_frames": 3}
    t = cfg["trainer"]
    # tests run without progress bars
    t["callbacks"] = [c for c in t.get("callbacks", []) if "ProgressBar" not in c["class_path"]]
    t.update(
        max_steps=8,
        val_check_interval=None,
        limit_val_batches=0,
        enable_progress_bar=False,
        log_every_n_steps=1,
    )
    t["default_root_dir"] = str(root)
    t["logger"] = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(root), "name": "logs"},
    }
    t.update(trainer)
    return cfg


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_pretokenized(cfg: dict, demo_data: Path, path: Path) -> Path:
    """Point ``cfg``'s training sources at a copy of the demo shards beside ``path``, write it
    there and pre-tokenize the copy for it (``mmscene data tokenize --config``), as a user would."""
    import shutil

    from mmscene.cli import main

    train = path.parent / "train"
    shutil.copytree(demo_data / "train", train)
    for source in cfg["data"]["train"]:
        source["shards"] = str(train / source["scenario"])
    write_config(cfg, path)
    assert main(["data", "tokenize", "--config", str(path)]) == 0
    return path


class RecordBatches(L.Callback):
    """Appends the sample keys of every training batch, with its step, its samples' tokens and its
    row slots, to a JSONL file."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        keys = [m["key"] for m in batch["meta"]]
        tokens = int((batch["sample_index"] >= 0).sum())
        record = {
            "step": trainer.global_step,
            "keys": keys,
            "tokens": tokens,
            "slots": batch["input_ids"].numel(),
            "anyres_images": sum(1 for size in batch.get("image_sizes") or () if size),
            "pretokenized": int(batch.get("pretokenized", 0)),
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class KillAt(L.Callback):
    """Kills the process (no clean shutdown) when training reaches ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.step:
            os._exit(3)


class SaveWeights(L.Callback):
    """Writes the model's final weights to ``path`` when training ends."""

    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        import torch

        torch.save({k: v.detach().clone() for k, v in pl_module.state_dict().items()}, self.path)


def export_hf_and_compare(ckpt: Path, out: Path):
    """Runs ``mmscene export hf`` on a training checkpoint and checks that transformers' Llava,
    loaded from the export, gives the trained core's logits (1e-5) on an image-text input.
    Returns the transformers model."""
    import subprocess
    import sys

    import torch
    from transformers import LlavaForConditionalGeneration

    from mmscene.train.checkpoint import load_module_from_checkpoint

    result = subprocess.run(
        [sys.executable, "-m", "mmscene.cli", "export", "hf", "--checkpoint", str(ckpt), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    module, _ = load_module_from_checkpoint(ckpt)
    ours = module.model.eval()
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    ids = torch.tensor([[5, 6, 7] + [hf.config.image_token_index] * ours.tokens_per_image() + [8, 9, 10]])
    pixels = torch.randn(1, 3, ours.image_size, ours.image_size)
    with torch.no_grad():
        torch.testing.assert_close(
            hf(input_ids=ids, pixel_values=pixels).logits, ours(ids, pixels).logits, atol=1e-5, rtol=0
        )
    return hf


def fit_and_validate(module, datamodule, root: Path, steps: int) -> L.Trainer:
    """``steps`` training steps on CPU, validation after the last, metrics in ``root/logs`` (CSV)."""
    from mmscene.train.trainer import MMSceneTrainer

    trainer = MMSceneTrainer(
        accelerator="cpu",
        max_steps=steps,
        val_check_interval=steps,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=2,
        logger=L.pytorch.loggers.CSVLogger(root, name="logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(root),
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer


def fit_quietly(module, data: dict, root: Path, **trainer) -> L.Trainer:
    """Train ``module`` on a tiny config's training sources (batches of 4) on CPU: no logger,
    checkpoints or progress bar; ``trainer`` adds Trainer arguments (``max_steps``, callbacks...)."""
    from mmscene.train.datamodule import MMSceneDataModule

    datamodule = MMSceneDataModule(
        tokenizer=data["tokenizer"],
        train=data["train"],
        scenarios=data["scenarios"],
        batch_size=4,
        max_length=512,
    )
    fitter = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        **trainer,
    )
    fitter.fit(module, datamodule=datamodule)
    return fitter
