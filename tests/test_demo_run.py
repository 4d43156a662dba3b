"""A short variant of ``make demo``: data, fit with validation, table and plot."""

import json

from train_helpers import tiny_config, write_config

from mmscene.demo import run


def test_demo_flow_end_to_end(tmp_path, capsys):
    data = tmp_path / "demo"
    kwargs = dict(n_train_per_scenario=8, n_val_per_scenario=2, progress=False)
    cfg = tiny_config(data, tmp_path / "run", max_steps=6, val_check_interval=3, limit_val_batches=None)
    log_dir = run(str(write_config(cfg, tmp_path / "c.yaml")), str(data), [], **kwargs)
    assert (log_dir / "demo.png").stat().st_size > 1000
    records = [json.loads(line) for line in (log_dir / "results.json").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6]
    scores = records[-1]["scores"]
    for scenario in ("single_image", "multi_image", "video", "3d"):
        assert 0.0 <= scores[f"{scenario}/overall"] <= 1.0
    assert "overall" in scores
    predictions = (log_dir / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 8  # every validation sample, once
    out = capsys.readouterr().out
    assert "validation at step 6" in out and "demo_motion" in out
