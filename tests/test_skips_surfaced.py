"""Skipped samples reach the user as numbers: training metrics, a table, and results.json."""

import csv
import io
import json
import shutil
import tarfile

from train_helpers import fit_and_validate, tiny_config

from mmscene.train.datamodule import MMSceneDataModule
from mmscene.train.module import MMSceneModule


def _corrupt_first_image(shard):
    """Rewrite ``shard`` with the first sample's image bytes replaced by garbage."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    victim = next(m.name for m, _ in members if m.name.endswith(".0.png"))
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            data = b"not an image" if member.name == victim else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return victim.split(".")[0]


def test_skips_are_logged_tabled_and_recorded(tmp_path, demo_data, capfd):
    data = tmp_path / "demo"
    shutil.copytree(demo_data, data)
    train_shards = sorted((data / "train" / "single_image").glob("*.tar"))
    for shard in train_shards:
        _corrupt_first_image(shard)
    val_key = _corrupt_first_image(sorted((data / "val" / "multi_image").glob("*.tar"))[0])
    cfg = tiny_config(data, tmp_path)
    m, d = cfg["model"], cfg["data"]
    # a second source of the same scenario: skips are counted per source, logged per scenario
    extra = next(dict(s, name="single_image_extra") for s in d["train"] if s["scenario"] == "single_image")
    d["train"] = [*d["train"], extra]
    module = MMSceneModule(model=m["model"], lr=m["lr"], max_new_tokens=2)
    dm = MMSceneDataModule(
        tokenizer=d["tokenizer"],
        train=d["train"],
        val=d["val"],
        scenarios=d["scenarios"],
        batch_size=8,
        eval_batch_size=8,
        max_length=512,
        shuffle_buffer=0,  # in shard order: the corrupt first samples are read in the first steps
    )
    fit_and_validate(module, dm, tmp_path, steps=6)
    with open(next((tmp_path / "logs").rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    logged = [
        float(r["data/skipped/single_image/corrupt_media"])
        for r in rows
        if r.get("data/skipped/single_image/corrupt_media")
    ]
    assert logged and logged[-1] >= 1 and logged == sorted(logged)  # a running total, as steps pass
    counted = dm.skipped()
    assert counted["single_image/corrupt_media"] >= 1 and counted["single_image_extra/corrupt_media"] >= 1
    # the metric sums the scenario's sources (at the last logged step, before the last batches)
    assert (
        counted["single_image/corrupt_media"]
        < logged[-1]
        <= (counted["single_image/corrupt_media"] + counted["single_image_extra/corrupt_media"])
    )
    results = [json.loads(line) for f in tmp_path.rglob("results.json") for line in f.open()]
    assert results[-1]["skipped"] == {"multi_image/corrupt_media": 1}, (val_key, results[-1])
    err = capfd.readouterr().err
    assert "skipped training samples" in err and "skipped val samples" in err and "corrupt_media" in err
    assert "single_image_extra" in err  # the table names the source
