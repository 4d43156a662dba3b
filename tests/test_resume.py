"""Exact resume: killed at step k, resumed from its checkpoint == an uninterrupted run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import tiny_config, write_config, write_pretokenized

TESTS = Path(__file__).resolve().parent


def _fit(config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.run(
        [sys.executable, "-m", "mmscene.cli", "fit", "--config", str(config), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _callbacks(record: Path, *more: dict) -> list[dict]:
    weights = {
        "class_path": "train_helpers.SaveWeights",
        "init_args": {"path": str(record.with_suffix(".pt"))},
    }
    return [{"class_path": "train_helpers.RecordBatches", "init_args": {"path": str(record)}}, weights, *more]


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _steps(record: Path) -> dict[int, list[str]]:
    return {r["step"]: r["keys"] for r in map(json.loads, record.read_text().splitlines())}


def _config(variant: str, demo_data: Path, root: Path, total: int, request) -> dict:
    cfg = tiny_config(demo_data, root, max_steps=total)
    if variant == "lora":  # a LoRA checkpoint holds adapters + projector; the base is re-read
        pytest.importorskip("peft")
        cfg["model"]["model"] = {"pretrained": str(request.getfixturevalue("tiny_pretrained"))}
        cfg["model"].update(freeze=["vision"], lora={"r": 4, "alpha": 8})
    if variant.startswith("anyres"):  # single images as AnyRes crops (tokens vary by image), packed rows
        cfg["model"]["model"]["config"].update(
            image_grid_pinpoints=[[48, 96], [96, 48], [96, 96]], patch_merge="spatial_unpad"
        )
        cfg["data"]["scenarios"]["single_image"] = {"anyres": True}
        cfg["data"]["batching"] = {"mode": "tokens", "max_tokens": 1024, "row_tokens": 512}
    return cfg


@pytest.mark.parametrize("variant", ["full", "lora", "anyres-packed", "anyres-pretokenized"])
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, demo_data, request, variant):
    """``anyres-pretokenized``: the killed and resumed runs read pre-tokenized shards, the
    uninterrupted one the plain shards; the weights must still be equal."""
    k, total = 4, 8
    full = _config(variant, demo_data, tmp_path / "full", total, request)
    full["trainer"]["callbacks"] = _callbacks(tmp_path / "full.jsonl")
    done = _fit(write_config(full, tmp_path / "full.yaml"))
    assert done.returncode == 0, done.stderr[-3000:]

    killed = _config(variant, demo_data, tmp_path / "killed", total, request)
    if variant == "anyres-pretokenized":
        write_pretokenized(killed, demo_data, tmp_path / "tokenize.yaml")
    killed["trainer"]["callbacks"] = _callbacks(
        tmp_path / "killed.jsonl",
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "ckpts"), "every_n_train_steps": k, "save_top_k": -1},
        },
        {"class_path": "train_helpers.KillAt", "init_args": {"step": k + 1}},
    )
    died = _fit(write_config(killed, tmp_path / "killed.yaml"))
    assert died.returncode == 3, died.stderr[-3000:]
    ckpt = next((tmp_path / "ckpts").glob(f"*step={k}.ckpt"))

    resumed = _config(variant, demo_data, tmp_path / "resumed", total, request)
    if variant == "anyres-pretokenized":
        resumed["data"]["train"] = killed["data"]["train"]
    resumed["trainer"]["callbacks"] = _callbacks(tmp_path / "resumed.jsonl")
    again = _fit(write_config(resumed, tmp_path / "resumed.yaml"), "--ckpt_path", str(ckpt))
    assert again.returncode == 0, again.stderr[-3000:]

    if variant.startswith("anyres"):  # AnyRes images really went through
        records = [json.loads(line) for line in (tmp_path / "full.jsonl").read_text().splitlines()]
        assert sum(r["anyres_images"] for r in records) > 0
    if (
        variant == "anyres-pretokenized"
    ):  # every resumed sample's ids came from its shard, none in the full run
        for name, want in (("resumed", True), ("full", False)):
            records = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
            assert all(r["pretokenized"] == (len(r["keys"]) if want else 0) for r in records), name
    # The resumed run sees exactly the samples the uninterrupted one saw after step k.
    full_steps, resumed_steps = _steps(tmp_path / "full.jsonl"), _steps(tmp_path / "resumed.jsonl")
    assert sorted(resumed_steps) == list(range(k, total))
    assert {s: full_steps[s] for s in range(k, total)} == resumed_steps

    # ... and ends with identical weights.
    a, b = _weights(tmp_path / "full.pt"), _weights(tmp_path / "resumed.pt")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
