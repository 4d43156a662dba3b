"""bench/peer_llamafactory.py needs LLaMA-Factory in a venv of its own (its docstring): without
it the bench says so and how to get it, instead of failing half-way or measuring nothing."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_peer_bench_says_what_it_needs(tmp_path):
    try:
        import llamafactory  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("llamafactory is installed here: the bench would run")
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "peer_llamafactory.py"),
        "--work",
        str(tmp_path),
        "--steps",
        "8",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "llamafactory" in done.stderr and "venv" in done.stderr, done.stderr[-2000:]
    assert not any(tmp_path.iterdir())  # nothing prepared before the check
