"""``make demo``: a short variant (data, fit with validation, table and plot) on every run, and
the real one behind ``MMSCENE_SLOW=1`` (every scenario learned to ≥ 0.8)."""

import json
import os
import re
from pathlib import Path

import pytest
from train_helpers import tiny_config, write_config

from mmscene.demo import run
from mmscene.registry import get_scenario

SCENARIOS = ("single_image", "multi_image", "video", "3d")


def rescored(rows: list[dict]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Each task's scores recomputed from the written predictions with the plugins' metrics, and
    per scenario the headline (first) score of each task and question type."""
    metrics: dict[tuple, dict] = {}
    for row in rows:
        key = (row["scenario"], row["task"], row["question_type"])
        if key not in metrics:
            metrics[key] = get_scenario(row["scenario"]).metrics(row["task"], row["question_type"])
        for metric in metrics[key].values():
            metric.update([row["prediction"]], [row["answer"]], [row.get("options")])
    scores, heads = {}, {}
    for (scenario, task, _), ms in metrics.items():
        values = {f"{scenario}/{task}/{name}": float(m.compute()) for name, m in ms.items()}
        scores.update(values)
        heads.setdefault(scenario, []).append(next(iter(values.values())))
    return scores, heads


def test_demo_flow_end_to_end(tmp_path, capsys):
    data = tmp_path / "demo"
    kwargs = dict(n_train_per_scenario=8, n_val_per_scenario=4, progress=False)
    cfg = tiny_config(data, tmp_path / "run", max_steps=6, val_check_interval=3, limit_val_batches=None)
    log_dir = run(str(write_config(cfg, tmp_path / "c.yaml")), str(data), [], **kwargs)
    assert (log_dir / "demo.png").stat().st_size > 1000
    records = [json.loads(line) for line in (log_dir / "results.json").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6]
    scores = records[-1]["scores"]

    rows = [json.loads(line) for line in (log_dir / "predictions.jsonl").read_text().splitlines()]
    val = [json.loads(line) for line in (data / "raw" / "val.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in rows) == sorted(r["id"] for r in val)  # every sample, once
    expected, heads = rescored(rows)
    for name, value in expected.items():
        assert scores[name] == pytest.approx(value, abs=1e-6), name
    for scenario in SCENARIOS:  # the overall is the mean of its tasks' headline scores
        assert scores[f"{scenario}/overall"] == pytest.approx(sum(heads[scenario]) / len(heads[scenario]))
    every = [v for values in heads.values() for v in values]
    assert scores["overall"] == pytest.approx(sum(every) / len(every))

    out = capsys.readouterr().out
    assert "validation at step 6" in out
    # BLEU-2..4 are recorded but not shown: 0 for every one-word answer, right or wrong
    assert (
        "3d/demo_solid/bleu_4" in scores and "bleu_1" in out and "bleu_2" not in out and "bleu_4" not in out
    )
    for name, value in scores.items():  # the table shows the recorded scores
        parts = name.split("/")
        if len(parts) == 3 and parts[2] == "accuracy":
            assert re.search(rf"{parts[1]}\s.*accuracy\s.*{value:.3f}", out), name


@pytest.mark.skipif(
    os.environ.get("MMSCENE_SLOW") != "1", reason="the full demo run (minutes): MMSCENE_SLOW=1"
)
def test_make_demo_learns_every_scenario(tmp_path, monkeypatch):
    # demo.yaml reads data/demo relative to the working directory: make it here, train on it here
    config = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    monkeypatch.chdir(tmp_path)
    log_dir = run(config, "data/demo", [f"--trainer.default_root_dir={tmp_path}"])
    assert log_dir.resolve().is_relative_to(tmp_path.resolve())
    scores = json.loads((log_dir / "results.json").read_text().splitlines()[-1])["scores"]
    for scenario in SCENARIOS:
        accuracy = [v for k, v in scores.items() if k.startswith(f"{scenario}/") and k.endswith("/accuracy")]
        assert accuracy and min(accuracy) >= 0.8, (scenario, accuracy)
