"""Two CPU ranks (gloo): DDP and FSDP2 agree with one process; FSDP2 resumes exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent


def _run(
    out: Path, strategy: str, devices: int, steps: int, data: Path, *extra: str
) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1"
    )
    cmd = [
        sys.executable,
        str(TESTS / "dist_script.py"),
        str(out),
        strategy,
        str(devices),
        str(steps),
        str(data),
        *extra,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def _steps(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory, demo_data):
    out = tmp_path_factory.mktemp("single")
    done = _run(out, "single", 1, 5, demo_data)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_match_one_process(tmp_path, demo_data, single, strategy):
    done = _run(tmp_path, strategy, 2, 5, demo_data)
    assert done.returncode == 0, done.stderr[-3000:]
    ref, got = _steps(single), _steps(tmp_path)
    assert [sorted(s["keys"]) for s in got] == [sorted(s["keys"]) for s in ref]  # same global batches
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * max(1.0, abs(a["loss"])), (
            a["step"],
            a["loss"],
            b["loss"],
        )
    assert ref[-1]["loss"] < ref[0]["loss"]  # it trains
    wa, wb = (
        torch.load(single / "weights.pt", weights_only=True),
        torch.load(tmp_path / "weights.pt", weights_only=True),
    )
    for name in wa:
        # summation order differs across ranks: float rounding, not data, separates the weights
        torch.testing.assert_close(wa[name], wb[name], atol=1e-4, rtol=1e-3)


def test_fsdp2_two_rank_exact_resume(tmp_path, demo_data):
    k, total = 3, 6
    full = _run(tmp_path / "full", "fsdp2", 2, total, demo_data, "stream")
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _run(tmp_path / "killed", "fsdp2", 2, total, demo_data, "stream", "-", str(k + 1))
    assert killed.returncode != 0
    ckpt = next((tmp_path / "killed" / "ckpts").glob(f"*step={k}*"))
    assert ckpt.is_dir()  # a sharded (distributed) checkpoint
    resumed = _run(tmp_path / "resumed", "fsdp2", 2, total, demo_data, "stream", str(ckpt))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref = {s["step"]: s["keys"] for s in _steps(tmp_path / "full")}
    got = {s["step"]: s["keys"] for s in _steps(tmp_path / "resumed")}
    assert sorted(got) == list(range(k, total))
    assert got == {s: ref[s] for s in range(k, total)}  # no sample repeated or skipped, on both ranks
    wa = torch.load(tmp_path / "full" / "weights.pt", weights_only=True)
    wb = torch.load(tmp_path / "resumed" / "weights.pt", weights_only=True)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_export_hf_from_sharded_fsdp2_checkpoint(tmp_path, demo_data):
    """A sharded (distributed) checkpoint consolidates and exports to a transformers Llava."""
    from train_helpers import export_hf_and_compare

    done = _run(tmp_path / "run", "fsdp2", 2, 6, demo_data, "stream", "-", "3")
    assert done.returncode != 0  # killed at step 3, after the step-2 checkpoint
    ckpt = next((tmp_path / "run" / "ckpts").glob("*step=2*"))
    export_hf_and_compare(ckpt, tmp_path / "hf")
