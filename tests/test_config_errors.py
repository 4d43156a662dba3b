"""A bad config fails at start with a message that names the problem."""

import subprocess
import sys

import pytest
import yaml
from train_helpers import tiny_config, write_config


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmscene.cli", *args], capture_output=True, text=True, timeout=300
    )


def _break(cfg: dict, how: str) -> dict:
    if how == "unknown_key":
        cfg["data"]["batch_sise"] = 4
    elif how == "missing_shards":
        cfg["data"]["train"][0]["shards"] = "/nonexistent/shard-*.tar"
    elif how == "weight":
        cfg["data"]["train"][1]["weight"] = 0
    elif how == "scenario":
        cfg["data"]["train"][2]["scenario"] = "hologram"
    elif how == "freeze":
        cfg["model"]["freeze"] = ["vison"]
    elif how == "anyres_without_pinpoints":
        cfg["data"]["scenarios"]["single_image"] = {"anyres": True}
    elif how == "pinpoints_off_grid":
        cfg["model"]["model"]["config"].update(image_grid_pinpoints=[[50, 96]], patch_merge="spatial_unpad")
    elif how == "lora_key":
        cfg["model"]["lora"] = {"rank": 8}
    return cfg


@pytest.mark.parametrize(
    "how, message",
    [
        ("unknown_key", "batch_sise"),
        ("missing_shards", "no shards match '/nonexistent/shard-*.tar'"),
        ("weight", "weight must be > 0"),
        ("scenario", "no installed plugin provides scenario 'hologram'"),
        ("freeze", "freeze: unknown parts ['vison']"),
        ("anyres_without_pinpoints", "['single_image'] cut images into AnyRes crops, but the model has no"),
        ("pinpoints_off_grid", "image_grid_pinpoints must be [height, width] multiples of 48"),
        ("lora_key", "model.lora: unknown keys ['rank']"),
    ],
)
def test_bad_config_fails_at_start(tmp_path, demo_data, how, message, capsys):
    from mmscene.train.cli import build_cli

    cfg = _break(tiny_config(demo_data, tmp_path), how)
    with pytest.raises((SystemExit, ValueError)) as failure:
        build_cli(["fit", "--config", str(write_config(cfg, tmp_path / "bad.yaml"))])
    text = str(failure.value) + capsys.readouterr().err
    assert message in text, text[-2000:]
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing trained


def test_print_config_round_trips(tmp_path, demo_data):
    cfg = tiny_config(demo_data, tmp_path)
    result = _run("fit", "--config", str(write_config(cfg, tmp_path / "ok.yaml")), "--print_config")
    assert result.returncode == 0, result.stderr[-2000:]
    printed = yaml.safe_load(result.stdout)
    assert printed["data"]["batch_size"] == 4
    assert printed["model"]["model"]["config"]["projector"] == "mlp2x_gelu"


@pytest.mark.parametrize("name", ["demo", "interleave-qwen-0.5b", "interleave-qwen-7b"])
def test_shipped_configs_parse(name):
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    result = _run("fit", "--config", str(config), "--print_config")
    assert result.returncode == 0, result.stderr[-2000:]
    printed = yaml.safe_load(result.stdout)
    assert printed["model"]["freeze"] == ([] if name == "demo" else ["vision"])
