"""BenchmarkEval during fit, on one process and on two FSDP2 ranks: lmms-eval scores are logged
after every optimizer step, and the last equals ``mmscene eval`` run afterwards, in one process,
on the run's final checkpoint (a ``.ckpt`` file, or the sharded folder FSDP2 writes): so every
rank's share was generated, gathered and scored, and both checkpoint kinds load for evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from lmms_tasks import write_demo_tasks
from test_distributed import TESTS, _run

pytest.importorskip("lmms_eval", reason="lmms-eval is installed by `make test`")


@pytest.mark.parametrize("strategy,devices", [("single", 1), ("fsdp2", 2)], ids=["1rank", "fsdp2-2ranks"])
def test_bench_scores_are_logged_during_fit(tmp_path, demo_data, strategy, devices):
    tasks = tmp_path / "tasks"
    write_demo_tasks(demo_data, tasks)
    out = tmp_path / "run"
    done = _run(out, strategy, devices, 2, demo_data, "--mode", "stream", "--bench", str(tasks),
                "--checkpoint-every", "2")  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    logged = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [1, 2]  # after every optimizer step, once each
    assert set(logged[-1]["scores"]) == {"mm_images"}

    ckpt = out / "ckpts" / "last.ckpt"
    assert ckpt.is_dir() == (strategy == "fsdp2")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-m", "mmscene.cli", "eval", "--checkpoint", str(ckpt), "--tasks", "mm_images",
         "--include_path", str(tasks), "--out", str(tmp_path / "eval")],  # fmt: skip
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    offline = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]["mm_images"]
    assert logged[-1]["scores"]["mm_images"]["overall_score"] == offline["overall_score,none"]
