"""BenchmarkEval during fit, on one process and on two FSDP2 ranks: lmms-eval scores are logged
at every evaluation step, and the last equals lmms-eval run afterwards, in one process, on the
weights the run ended with (so the ranks' shares were all generated, gathered and scored)."""

from __future__ import annotations

import json

import pytest
import torch
from lmms_tasks import write_demo_tasks
from test_distributed import _run
from train_helpers import tiny_config

pytest.importorskip("lmms_eval", reason="lmms-eval is installed by `make test`")


def _offline_scores(data, out, tasks) -> dict:
    """mm_images on the run's final weights, in this process."""
    from mmscene.eval.harness import run_tasks, scores
    from mmscene.eval.lmms_model import MMSceneLMM
    from mmscene.eval.session import DataSettings, EvalSession
    from mmscene.train.datamodule import load_tokenizer
    from mmscene.train.module import MMSceneModule

    cfg = tiny_config(data, out)
    cfg["model"]["model"]["config"]["text"]["tie_word_embeddings"] = False  # as tests/dist_script.py
    module = MMSceneModule(model=cfg["model"]["model"])
    module.configure_model()
    module.model.load_state_dict(torch.load(out / "weights.pt", weights_only=True))
    module.model.eval()
    session = EvalSession(
        module.model, load_tokenizer(cfg["data"]["tokenizer"]), DataSettings.of(cfg["data"])
    )
    results = run_tasks(
        MMSceneLMM(session=session), ["mm_images"], include_path=[str(tasks)], log_samples=False
    )
    return scores(results)


@pytest.mark.parametrize("strategy,devices", [("single", 1), ("fsdp2", 2)], ids=["1rank", "fsdp2-2ranks"])
def test_bench_scores_are_logged_during_fit(tmp_path, demo_data, strategy, devices):
    tasks = tmp_path / "tasks"
    write_demo_tasks(demo_data, tasks)
    out = tmp_path / "run"
    done = _run(out, strategy, devices, 2, demo_data, "--mode", "stream", "--bench", str(tasks))
    assert done.returncode == 0, done.stderr[-4000:]
    logged = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [1, 2]  # after every optimizer step, once each
    assert set(logged[-1]["scores"]) == {"mm_images"}
    assert logged[-1]["scores"] == _offline_scores(demo_data, out, tasks)
