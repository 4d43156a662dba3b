"""Every shipped config runs in miniature: its strategy, precision, batching, accumulation,
validation and callbacks, with tiny dims, the demo data, CPU and 2 ranks where it has several GPUs.
The training shards are pre-tokenized for the config first (``mmscene data tokenize --config``),
as a user of the recipe would, and every step must read its ids from them.

What changes, and why, is spelled out in :func:`miniature`; everything else is the file's own.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from train_helpers import write_pretokenized

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
STEPS = 3


def _shrink(model_spec: dict, demo_data: Path, pretrained: Path) -> dict:
    if "config" in model_spec:
        from train_helpers import tiny_config

        return tiny_config(demo_data, demo_data)["model"]["model"]
    return {"pretrained": str(pretrained)}  # pretrained / components: the tiny llava-hf stand-in


def miniature(cfg: dict, demo_data: Path, pretrained: Path, root: Path) -> dict:
    m, d, t = cfg["model"], cfg["data"], cfg["trainer"]
    m["model"] = _shrink(m["model"], demo_data, pretrained)
    m["max_new_tokens"] = 3
    d["tokenizer"] = str(demo_data / "tokenizer")
    for split in ("train", "val", "test"):
        for source in d.get(split) or []:
            source["shards"] = str(demo_data / ("val" if split == "test" else split) / source["scenario"])
    options = d.setdefault("scenarios", {})
    options["video"] = {**options.get("video", {}), "num_frames": 3}
    options["3d"] = {**options.get("3d", {}), "num_views": 2, "view_size": 32}
    d["max_length"] = 512
    if (d.get("batching") or {}).get("mode") == "tokens":  # same mode, a budget tiny samples fill
        d["batching"] = {**d["batching"], "max_tokens": 1024, "lookahead": 8}
        if d["batching"].get("row_tokens"):
            d["batching"]["row_tokens"] = 512
    d["batch_size"] = min(d["batch_size"], 4)
    d["eval_batch_size"] = min(d["eval_batch_size"], 8)
    d["num_workers"] = min(d["num_workers"], 1)  # 2 cores
    devices = 2 if t.get("devices", 1) != 1 or t.get("num_nodes", 1) > 1 else 1
    strategy = t.get("strategy")
    if isinstance(strategy, dict) and "data_parallel_size" in strategy.get("init_args", {}):
        strategy["init_args"]["data_parallel_size"] = devices
    accumulate = t.get("accumulate_grad_batches", 1)
    t.update(
        accelerator="cpu",
        devices=devices,
        num_nodes=1,
        max_steps=STEPS,
        val_check_interval=2 * accumulate,  # batches: a validation after optimizer step 2
        log_every_n_steps=1,
        default_root_dir=str(root),
    )
    for callback in t.get("callbacks") or []:
        args = callback.get("init_args", {})
        if "every_n_train_steps" in args:
            args["every_n_train_steps"] = 2
    if isinstance(t.get("logger"), dict):
        t["logger"]["init_args"]["save_dir"] = str(root)
    return cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_runs_in_miniature(path, tmp_path, demo_data, tiny_pretrained):
    cfg = miniature(yaml.safe_load(path.read_text()), demo_data, tiny_pretrained, tmp_path / "run")
    config = write_pretokenized(cfg, demo_data, tmp_path / path.name)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "mmscene.cli", "fit", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = [json.loads(line) for f in (tmp_path / "run").rglob("results.json") for line in f.open()]
    assert [r["step"] for r in results] == [2], results  # the validation after step 2 ran
    scenarios = {s["scenario"] for s in cfg["data"]["val"]}
    for scenario in scenarios:
        assert any(k.startswith(f"{scenario}/") for k in results[0]["scores"]), results[0]["scores"]
    # the telemetry of every step (log_every_n_steps: 1), beside the loss
    (metrics,) = (tmp_path / "run").rglob("metrics.csv")
    with open(metrics) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/tokens_per_s")]
    assert [int(r["step"]) for r in rows] == list(range(STEPS))
    for name in ("train/mfu_lm", "train/mfu_with_vit", "train/grad_norm", "train/padding_efficiency"):
        assert all(float(r[name]) > 0 for r in rows), name
    assert all(float(r["train/pretokenized"]) == 1.0 for r in rows)  # no sample tokenized in the loop
    assert any(k.startswith("train/loss/") and v for r in rows for k, v in r.items())
    checkpoints = sorted(p.name for p in (tmp_path / "run").rglob("*.ckpt"))
    assert any("step=2" in name for name in checkpoints) and "last.ckpt" in checkpoints, checkpoints
