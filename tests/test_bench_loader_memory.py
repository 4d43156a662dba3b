"""bench/loader_memory.py runs end to end on a short stream and prints its figures."""

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "loader_memory.py"


def _run(demo_data, samples, *extra):
    cmd = [sys.executable, str(BENCH), "--data", str(demo_data), "--samples", str(samples)]
    cmd += ["--workers", "1", "--interval", "80", "--warmup", "80", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_loader_memory_bench_prints_figures(demo_data):
    out = _run(demo_data, 320)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    rows = re.findall(r"^\| (\d+) \| [\d.]+ \| [\d.]+ MiB \| [\d.]+ MiB \| ([\d.]+) MiB \|", text, re.M)
    assert len(rows) == 5 and int(rows[-1][0]) >= 320, text  # first batch, then every interval
    assert re.search(r"summed RSS [\d.]+ MiB at \d+ samples \(baseline, after warm-up\) -> [\d.]+ MiB", text)
    assert re.search(r": [+-][\d.]+ MiB, [\d.]+x", text), text  # growth in MiB and as a ratio
    assert re.search(r"data state per batch \(pickled\): [\d.]+ KiB", text), text
    assert re.search(r"[\d.]+ samples/s over [\d.]+ s wall", text), text
    assert re.search(r"[\d.]+ samples per CPU-second", text), text
    assert "OK: RSS growth after warm-up" in text


def test_loader_memory_bench_fails_past_the_threshold(demo_data):
    out = _run(demo_data, 160, "--max-growth-mib", "-1000")  # any reading "grows" past -1000 MiB
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAIL: loader RSS (main + workers) grew by" in out.stderr
