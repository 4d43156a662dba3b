"""bench/loop_breakdown.py in miniature: both loops train on the same batches and the data time
is split into stages that add up to at most the measured data time."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_loop_breakdown_runs_and_accounts_for_its_data_time(demo_data):
    cmd = [sys.executable, str(ROOT / "bench" / "loop_breakdown.py"), "--data", str(demo_data)]
    cmd += ["--steps", "4", "--warmup", "1", "--max-tokens", "1024", "--row-tokens", "512"]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    data = float(re.search(r"of which data\s+([\d.]+)", out).group(1))
    stages = [float(m) for m in re.findall(r"^ {4}\S.*?\s([\d.]+)\s+[\d.]+\s+[\d.]+%$", out, re.M)]
    assert len(stages) == 4, out
    assert 0 < sum(stages) <= data + 0.01, out
    assert re.search(r"summary: mmscene's loop from shards runs at [\d.]+x the plain", out), out
