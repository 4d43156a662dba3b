"""``mmscene predict``: a JSONL of prompts with media paths in, one answer per usable prompt out."""

import json

from train_helpers import tiny_config, write_config

from mmscene.data.tools.demo import make_demo
from mmscene.train.cli import build_cli


def _predict(config, prompts, media_root, out, ckpt, eval_batch_size):
    build_cli(
        [
            "predict",
            "--config",
            str(config),
            "--ckpt_path",
            str(ckpt),
            "--data.predict",
            str(prompts),
            "--data.predict_media_root",
            str(media_root),
            "--data.predict_output",
            str(out),
            "--data.eval_batch_size",
            str(eval_batch_size),
        ]
    )
    return {row["id"]: row for row in map(json.loads, out.read_text().splitlines())}


def test_predict_answers_as_unbatched_generation_and_reports_bad_prompts(tmp_path):
    """A briefly trained checkpoint answers every usable prompt; batched (left-padded) prediction
    gives the answers prompt-by-prompt generation gives; bad prompts are rejected with reasons."""
    data = tmp_path / "demo"
    make_demo(data, n_train_per_scenario=16, n_val_per_scenario=2, progress=False)
    cfg = tiny_config(data, tmp_path / "run", max_steps=80)
    cfg["model"].update(warmup_steps=5, lr={"vision": 6e-3, "projector": 6e-3, "llm": 6e-3})
    cfg["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}
    ]
    config = write_config(cfg, tmp_path / "c.yaml")
    build_cli(["fit", "--config", str(config)])
    ckpt = next((tmp_path / "run").rglob("last.ckpt"))

    raw = [json.loads(line) for line in (data / "raw" / "val.jsonl").read_text().splitlines()]
    rows = [
        {
            **{k: r[k] for k in ("id", "image", "video", "mesh") if k in r},
            "prompt": r["conversations"][0]["value"],
        }
        for r in raw
    ]
    rows.append({"id": "escape", "image": ["../../etc/passwd"], "prompt": "<image>\nWhat is this?"})
    rows.append({"id": "missing", "image": ["nowhere.png"], "prompt": "<image>\nWhat is this?"})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    media = data / "raw" / "media"

    batched = _predict(config, prompts, media, tmp_path / "batched.jsonl", ckpt, eval_batch_size=8)
    single = _predict(config, prompts, media, tmp_path / "single.jsonl", ckpt, eval_batch_size=1)
    assert sorted(batched) == sorted(r["id"] for r in raw)  # every usable prompt, once
    # the converter infers each prompt's scenario from its media (ids are demo-val-<scenario>-N)
    assert {k: v["scenario"] for k, v in batched.items()} == {k: k.split("-")[2] for k in batched}
    assert {k: v["answer"] for k, v in batched.items()} == {k: v["answer"] for k, v in single.items()}
    assert any(v["answer"] for v in batched.values())  # the trained model does answer
    rejected = [
        json.loads(line)
        for line in (tmp_path / "run" / "predict_shards" / "shards" / "rejected.jsonl").open()
    ]
    assert sorted((r["id"], r["reason"]) for r in rejected) == [
        ("escape", "path_escapes_root"),
        ("missing", "missing_media"),
    ]
