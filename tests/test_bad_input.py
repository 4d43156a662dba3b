"""A corpus of every defect class through ``fit`` + validation: nothing crashes, nothing is
dropped without a count, every defect is counted under its own reason (tests/bad_corpus.py)."""

import json

import bad_corpus
from train_helpers import fit_and_validate, tiny_config

from mmscene.train.datamodule import MMSceneDataModule
from mmscene.train.module import MMSceneModule

SCENARIO = {"images": "single_image", "clips": "video", "meshes": "3d", "tars": "single_image"}


def test_every_defect_is_survived_and_counted_under_its_reason(tmp_path, demo_data, capfd):
    folders = bad_corpus.build(demo_data, tmp_path / "corpus")
    broken = [{"shards": f, "scenario": SCENARIO[name], "name": name} for name, f in folders.items()]
    cfg = tiny_config(demo_data, tmp_path)
    m, d = cfg["model"], cfg["data"]
    module = MMSceneModule(model=m["model"], lr=m["lr"], max_new_tokens=2)
    dm = MMSceneDataModule(
        tokenizer=d["tokenizer"],
        train=[*d["train"], *broken],
        val=broken,
        scenarios=d["scenarios"],
        batch_size=4,
        eval_batch_size=4,
        num_workers=2,
        max_length=512,
        shuffle_buffer=8,
    )
    trainer = fit_and_validate(module, dm, tmp_path, steps=8)
    assert trainer.global_step == 8

    # validation: one pass over the corpus, every defect counted once under its reason
    results = [json.loads(line) for f in tmp_path.rglob("results.json") for line in f.open()]
    assert results[-1]["skipped"] == bad_corpus.EXPECTED
    assert "overall" in results[-1]["scores"]
    predictions = [json.loads(line) for f in tmp_path.rglob("predictions.jsonl") for line in f.open()]
    assert len(predictions) == sum(bad_corpus.GOOD.values())  # every readable sample was scored

    # training went on through the same defects, counting them with the same reasons
    counted = dm.skipped()
    assert counted and set(counted) <= set(bad_corpus.EXPECTED), counted
    assert not [k for k in counted if "/error_" in k]  # no defect reached an unexpected exception
    err = capfd.readouterr().err
    assert "skipped val samples" in err and "oversized_member" in err and "unsafe_member_name" in err
