"""bench/loop_breakdown.py in miniature: the three loops train on the same batches (the bench
stops where the pre-tokenized shards give another one), the stored ids serve every sample, and
each data time is split into stages that add up to at most the measured data time."""

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
    used = re.search(r"stored ids used for (\d+) of (\d+) samples", out)
    assert used and used.group(1) == used.group(2) and int(used.group(1)) > 0, out
    data = [float(m) for m in re.findall(r"of which data\s+([\d.]+)", out)]
    blocks = re.split(r"^mmscene \(", out, flags=re.M)[1:]
    assert len(data) == len(blocks) == 2, out
    for total, block in zip(data, blocks):
        stages = [float(m) for m in re.findall(r"^ {4}\S.*?\s([\d.]+)\s+[\d.]+\s+[\d.]+%$", block, re.M)]
        assert len(stages) == 4, block
        assert 0 < sum(stages) <= total + 0.01, block
    assert re.search(
        r"summary: from shards [\d.]+x the plain loop .* pre-tokenized vs from shards [\d.]+x", out
    ), out
