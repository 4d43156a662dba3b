"""Shuffling: the converter mixes grouped annotations across shards, streams shuffle through a
bounded buffer held as restore keys, and a resumed stream continues the same order."""

import json

import webdataset as wds
from fixtures_media import write_photo
from test_mixer import write_shards

from mmscene.data.ingest.convert import convert
from mmscene.data.pipeline.stream import ShardStream


def _keys(stream, n):
    it = iter(stream)
    return [next(it)["__key__"] for _ in range(n)]


def _adjacent_in_order(keys):
    """Share of neighbours that are also neighbours in the shards (1.0: read in order)."""
    index = {k: int(k[1:]) for k in keys}
    return sum(index[b] == index[a] + 1 for a, b in zip(keys, keys[1:])) / (len(keys) - 1)


def test_stream_shuffles_within_a_bounded_window(tmp_path):
    shards = write_shards(tmp_path / "s", "a", 200, 50)
    in_order = _keys(ShardStream(shards, 0, 1, seed=3, name="s", shuffle=False), 200)
    assert _adjacent_in_order(in_order) > 0.98
    keys = _keys(ShardStream(shards, 0, 1, seed=3, name="s", buffer_size=32), 200)
    assert _adjacent_in_order(keys) < 0.2
    # every sample of a shard comes out within the buffer's reach of where it was read
    first_epoch = set(keys[: 200 - 32])
    assert len(first_epoch) == len(keys[: 200 - 32])  # no repeats before the buffer wraps
    # the same seed gives the same order; another seed another
    assert keys == _keys(ShardStream(shards, 0, 1, seed=3, name="s", buffer_size=32), 200)
    assert keys != _keys(ShardStream(shards, 0, 1, seed=4, name="s", buffer_size=32), 200)


def test_resumed_stream_continues_the_same_order_from_restore_keys(tmp_path):
    shards = write_shards(tmp_path / "s", "a", 90, 20)
    ref = ShardStream(shards, 1, 2, seed=5, name="s", buffer_size=16)
    it = iter(ref)
    before = [next(it)["__key__"] for _ in range(37)]
    state = ref.state_dict()
    after = [next(it)["__key__"] for _ in range(80)]  # crosses epochs
    # the state is small and declarative: integers only, one pair per buffered sample
    text = json.dumps(state)
    # (15: the last sample taken leaves a gap that the next read fills)
    assert len(state["buffer"]) == 15 and all(isinstance(v, int) for pair in state["buffer"] for v in pair)
    assert len(text) < 400
    resumed = ShardStream(shards, 1, 2, seed=5, name="s", buffer_size=16)
    resumed.load_state_dict(json.loads(text))
    assert resumed.state_dict() == state  # unchanged until the next sample is taken
    assert _keys(resumed, 80) == after
    assert before + after != sorted(before + after)


def _grouped_annotations(media, path, per_group=12):
    write_photo(media / "x.png", size=(40, 30))
    rows = []
    for group in ("alpha", "beta", "gamma"):
        for i in range(per_group):
            rows.append(
                {
                    "id": f"{group}-{i}",
                    "image": "x.png",
                    "conversations": [
                        {"from": "human", "value": "<image>\nwhat?"},
                        {"from": "gpt", "value": group},
                    ],
                    "metadata": {"dataset": group},
                }
            )
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path, [r["id"] for r in rows]


def _shard_ids(out):
    urls = sorted(str(p) for p in (out / "single_image").glob("shard-*.tar"))
    return [json.loads(s["json"])["id"] for s in wds.WebDataset(urls, shardshuffle=False)]


def test_convert_shuffles_records_across_shards_unless_asked_to_keep_order(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    ann, listed = _grouped_annotations(media, tmp_path / "ann.jsonl")
    shuffled = convert(ann, media, tmp_path / "a", shard_size=6, progress=False)
    ids = _shard_ids(tmp_path / "a")
    assert sorted(ids) == sorted(listed) and ids != listed
    # each shard mixes the sub-datasets instead of holding one of them
    shards = [ids[i : i + 6] for i in range(0, len(ids), 6)]
    assert sum(len({k.split("-")[0] for k in shard}) > 1 for shard in shards) >= len(shards) - 1
    assert shuffled["options"]["order"] == "shuffled (seed 0)"
    # reproducible: the same seed gives the same shards, whatever the worker count
    convert(ann, media, tmp_path / "b", shard_size=6, workers=2, progress=False)
    assert _shard_ids(tmp_path / "b") == ids
    convert(ann, media, tmp_path / "c", shard_size=6, progress=False, seed=1)
    assert _shard_ids(tmp_path / "c") != ids
    kept = convert(ann, media, tmp_path / "d", shard_size=6, progress=False, keep_order=True)
    assert _shard_ids(tmp_path / "d") == listed and kept["options"]["order"] == "annotations"
    assert not list(tmp_path.glob("*/.records.part"))  # the spill file is gone
    index = json.loads((tmp_path / "a" / "single_image" / "shards.json").read_text())
    assert sum(e["samples"] for e in index["shards"].values()) == len(listed)


def test_later_epochs_reuse_clean_scans_and_rescan_changed_shards(tmp_path, monkeypatch):
    """A small source with a large buffer goes round its shards many times: the same order as
    reading every header again, one header read per shard while the files are unchanged."""
    import os

    from mmscene.data.pipeline import stream as stream_module

    shards = write_shards(tmp_path / "s", "a", 30, 10)
    reads = []
    real = stream_module.ShardScan

    class Counting(real):
        def __iter__(self):
            reads.append(self.path)
            return super().__iter__()

    monkeypatch.setattr(stream_module, "ShardScan", Counting)
    keys = _keys(ShardStream(shards, 0, 1, seed=3, name="s", buffer_size=200), 300)  # ~17 epochs
    assert sorted(reads) == sorted(shards)  # each shard's headers read once
    monkeypatch.setattr(stream_module, "MAX_CACHED_LOCATIONS", 0)  # nothing kept: every epoch reads
    reads.clear()
    assert keys == _keys(ShardStream(shards, 0, 1, seed=3, name="s", buffer_size=200), 300)
    assert len(reads) > 3 * len(shards)
    monkeypatch.setattr(stream_module, "MAX_CACHED_LOCATIONS", 100_000)
    # a shard rewritten between epochs is read again, and its new samples come out
    stream = ShardStream(shards, 0, 1, seed=3, name="s", shuffle=False)
    it = iter(stream)
    first = [next(it)["__key__"] for _ in range(30)]
    replacement = write_shards(tmp_path / "t", "b", 10, 10)[0]
    os.replace(replacement, shards[0])
    reads.clear()
    second = [next(it)["__key__"] for _ in range(30)]
    assert reads == [shards[0]]
    assert first[:10] == [f"a{i:05d}" for i in range(10)] and second[:10] == [f"b{i:05d}" for i in range(10)]
