import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small demo dataset (all four scenarios) shared by the training tests."""
    from mmscene.data.tools.demo import make_demo

    out = tmp_path_factory.mktemp("demo")
    make_demo(out, n_train_per_scenario=16, n_val_per_scenario=4, progress=False)
    return out


@pytest.fixture(autouse=True)
def _keep_mmscene_log_handlers():
    """``mmscene.cli.main`` adds a stderr handler once per process; one bound to a finished
    test's captured stream would raise logging errors in later tests."""
    import logging

    logger = logging.getLogger("mmscene")
    handlers, level = list(logger.handlers), logger.level
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """A one-task SLURM environment whose ``scontrol`` only records its arguments (returned path)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "mmscene", "SLURM_JOB_ID": "4242"}.items():
        monkeypatch.setenv(key, value)
    for key in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID"):
        monkeypatch.setenv(key, "0")
    return calls


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory, demo_data) -> Path:
    """A tiny transformers-Llava checkpoint standing in for ``llava-hf/llava-interleave-qwen-*``
    (the configs continue from one; the hub is out of reach here)."""
    from train_helpers import tiny_config

    from mmscene.model import save_pretrained
    from mmscene.train.module import MMSceneModule

    cfg = tiny_config(demo_data, tmp_path_factory.mktemp("unused"))
    cfg["model"]["model"]["config"]["text"]["tie_word_embeddings"] = False
    module = MMSceneModule(model=cfg["model"]["model"])
    module.configure_model()
    out = tmp_path_factory.mktemp("llava-hf")
    save_pretrained(module.model, out, format="llava-hf")
    return out
