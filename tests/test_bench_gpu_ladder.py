"""The GPU ladder's code path, dry-run on CPU: every rung trains and reports its row."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_ladder_dry_run(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_fsdp2_step.py"), "--device", "cpu", "--tiny"]
    cmd += ["--samples", "16", "--max-tokens", "2048", "--warmup", "1", "--out", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT="29533")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu_fsdp2_step.json").read_text())["rows"]
    assert [r["rung"] for r in rows] == ["padded", "packed", "+fused-loss", "+varlen", "+compile"]
    assert rows[0]["padding_efficiency"] < 1 and all(r["padding_efficiency"] == 1 for r in rows[1:])
    # same weights and batches: every packed rung computes the same first steps' loss
    losses = [r["last_loss"] for r in rows[1:]]
    assert max(losses) - min(losses) < 1e-3, losses
