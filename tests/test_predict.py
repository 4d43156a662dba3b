"""``mmscene predict``: a JSONL of prompts with media paths in, one answer per usable prompt out."""

import json

from train_helpers import tiny_config, write_config

from mmscene.data.tools.demo import make_demo
from mmscene.train.cli import build_cli


def test_predict_writes_answers_and_reports_bad_prompts(tmp_path):
    data = tmp_path / "demo"
    make_demo(data, n_train_per_scenario=2, n_val_per_scenario=2, progress=False)
    raw = [json.loads(line) for line in (data / "raw" / "val.jsonl").read_text().splitlines()]
    rows = []
    for r in raw[:6]:
        row = {k: r[k] for k in ("id", "image", "video", "mesh") if k in r}
        row["prompt"] = r["conversations"][0]["value"]
        rows.append(row)
    rows.append({"id": "escape", "image": ["../../etc/passwd"], "prompt": "<image>\nWhat is this?"})
    rows.append({"id": "missing", "image": ["nowhere.png"], "prompt": "<image>\nWhat is this?"})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "answers.jsonl"
    cfg = tiny_config(data, tmp_path / "run")
    build_cli(
        [
            "predict",
            "--config",
            str(write_config(cfg, tmp_path / "c.yaml")),
            "--data.predict",
            str(prompts),
            "--data.predict_media_root",
            str(data / "raw" / "media"),
            "--data.predict_output",
            str(out),
        ]
    )
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(answers) == 6
    assert {a["scenario"] for a in answers} <= {"single_image", "multi_image", "video", "3d"}
    assert all(isinstance(a["answer"], str) for a in answers)
    rejected = (tmp_path / "run" / "predict_shards" / "shards" / "rejected.jsonl").read_text()
    assert "path_escapes_root" in rejected and "missing_media" in rejected
