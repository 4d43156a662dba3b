"""The mixer: weights honoured, every slot resumable to the exact sample, uneven data never hangs."""

import io
import json
from collections import Counter

import pytest
import webdataset as wds
from PIL import Image

from mmscene.data.pipeline.mixer import MixedBatches, Source, WeightedChoice
from mmscene.scenario import Example, Prompt, Scenario, SkipSample
from mmscene.schema import make_record


def test_weighted_choice_proportions_over_10k():
    weights = [0.5, 0.3, 0.15, 0.05]
    for slot in range(3):
        choose = WeightedChoice(weights, seed=7, rank=1, slot=slot)
        counts = Counter(choose(d) for d in range(10_000))
        for i, w in enumerate(weights):
            assert abs(counts[i] / 10_000 - w) < 0.02


def write_shards(folder, prefix, n_samples, per_shard, corrupt=()):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, n_samples, per_shard):
        path = folder / f"shard-{start // per_shard:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(start, min(n_samples, start + per_shard)):
                key = f"{prefix}{i:05d}"
                record = make_record(
                    id=key,
                    scenario="toy",
                    task="toy",
                    question_type="open-ended",
                    conversations=[
                        {"role": "user", "content": "<image>\nwhich?"},
                        {"role": "assistant", "content": key},
                    ],
                    media=[{"member": "0.png", "type": "image"}],
                )
                buf = io.BytesIO()
                Image.new("RGB", (4, 4), (i % 255, 0, 0)).save(buf, format="PNG")
                png = b"garbage" if i in corrupt else buf.getvalue()
                sink.write({"__key__": key, "json": json.dumps(record).encode(), "0.png": png})
        paths.append(str(path))
    return paths


class Toy(Scenario):
    name = "toy"

    def load(self, sample):
        record = self.read_record(sample)
        try:
            Image.open(io.BytesIO(sample["0.png"])).load()
        except Exception as err:
            raise SkipSample("corrupt_media", str(err)) from err
        return Example(sample["__key__"], "toy", record["task"], record["conversations"], record=record)

    def format(self, example, rng):
        conversation = [dict(t, content=t["content"].replace("<image>", "")) for t in example.conversation]
        return Prompt(example.key, "toy", example.task, conversation, [], [], answer=str(rng.random()))


def encode(prompt):
    return {"key": prompt.key, "answer": prompt.answer}


def collate(samples):
    return {"keys": [s["key"] for s in samples], "draws": [s["answer"] for s in samples]}


def make(tmp_path, **kw):
    sources = [
        Source(shards=str(tmp_path / "a" / "*.tar"), scenario="toy", weight=3, name="a"),
        Source(shards=str(tmp_path / "b" / "*.tar"), scenario="toy", weight=1, name="b"),
    ]
    return MixedBatches(sources, {"toy": Toy()}, encode, collate, batch_size=4, seed=3, **kw)


def test_resume_continues_the_exact_sequence(tmp_path):
    write_shards(tmp_path / "a", "a", 23, 5, corrupt={4})
    write_shards(tmp_path / "b", "b", 7, 3)
    ref = iter(make(tmp_path))
    batches = [next(ref) for _ in range(12)]

    resumed_ds = make(tmp_path)
    state = batches[4]["_data_state"]
    resumed_ds.resume = {"consumed": 5, "slots": {str(state["slot"]): state["state"]}}
    resumed = iter(resumed_ds)
    for expected in batches[5:]:
        got = next(resumed)
        assert got["keys"] == expected["keys"]
        assert got["draws"] == expected["draws"]  # formatting randomness continues too
    # the corrupt sample was counted, not silently dropped
    assert batches[-1]["_data_state"]["state"]["skips"].get("a/corrupt_media", 0) >= 1


def test_formatting_does_not_predict_the_next_source(tmp_path):
    """The formatting draw of sample d (here: the Toy plugin's first rng value) and the source of
    sample d + 1 come from independent streams: knowing one says nothing about the other."""
    write_shards(tmp_path / "a", "a", 20, 5)
    write_shards(tmp_path / "b", "b", 20, 5)
    stream = iter(make(tmp_path))
    keys, values = [], []
    for _ in range(600):  # 2400 samples, in draw order
        batch = next(stream)
        keys += batch["keys"]
        values += [float(v) for v in batch["draws"]]
    next_is_a = {True: [], False: []}
    for value, key in zip(values, keys[1:]):
        next_is_a[value < 0.75].append(key.startswith("a"))
    for low, outcomes in next_is_a.items():
        share = sum(outcomes) / len(outcomes)
        assert abs(share - 0.75) < 0.06, (low, share, len(outcomes))  # source a has weight 3 of 4


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_get_disjoint_samples_and_never_starve(tmp_path, world):
    """Each rank reads its own part of every source (whole shards when there are enough, every
    n-th sample of a shard when not) and the parts cover the source; a rank whose part would be
    empty (2 samples, 3 ranks) reads the whole source instead of starving."""
    write_shards(tmp_path / "a", "a", 21, 3)  # 7 shards: split by shard
    write_shards(tmp_path / "b", "b", 5, 5)  # 1 shard: split by sample
    write_shards(tmp_path / "c", "c", 2, 2)  # 1 shard of 2: the third rank falls back
    sources = [Source(shards=str(tmp_path / n / "*.tar"), scenario="toy", name=n) for n in "abc"]
    seen: list[dict[str, set[str]]] = []
    for rank in range(world):
        ds = MixedBatches(sources, {"toy": Toy()}, encode, collate, 4, seed=3, rank=rank, world_size=world)
        it = iter(ds)
        keys = [k for _ in range(150) for k in next(it)["keys"]]  # every part read many times over
        seen.append({n: {k for k in keys if k.startswith(n)} for n in "abc"})
    for name, total in (("a", 21), ("b", 5)):
        parts = [s[name] for s in seen]
        assert all(parts), (name, parts)
        assert sum(map(len, parts)) == len(set().union(*parts)) == total, (name, parts)  # disjoint, covering
    assert seen[0]["b"] == {f"b{i:05d}" for i in range(0, 5, world)}  # every world-th sample
    c_parts = [s["c"] for s in seen]
    if world == 2:
        assert c_parts == [{"c00000"}, {"c00001"}]
    else:
        assert c_parts[:2] == [{"c00000"}, {"c00001"}] and c_parts[2] == {"c00000", "c00001"}


def test_source_validation(tmp_path):
    with pytest.raises(ValueError, match="weight must be > 0"):
        Source(shards="x", scenario="toy", weight=0)
    with pytest.raises(FileNotFoundError, match="no shards match"):
        MixedBatches(
            [Source(shards=str(tmp_path / "none*.tar"), scenario="toy")], {"toy": Toy()}, encode, collate, 2
        )


def test_a_source_that_only_skips_fails_loudly(tmp_path):
    write_shards(tmp_path / "a", "a", 5, 5, corrupt=set(range(5)))
    ds = MixedBatches(
        [Source(shards=str(tmp_path / "a" / "*.tar"), scenario="toy")], {"toy": Toy()}, encode, collate, 2
    )
    ds.max_consecutive_skips = 50
    with pytest.raises(RuntimeError, match=r"50 samples in a row were skipped .*toy/corrupt_media"):
        next(iter(ds))


def test_tiny_shard_fallback_resumes_exactly(tmp_path):
    # 3 ranks, one shard of 2 samples per source: rank 2 gets nothing by sample splitting and
    # falls back to reading everything; that decision is part of the saved state.
    write_shards(tmp_path / "a", "a", 2, 10)
    write_shards(tmp_path / "b", "b", 2, 10)
    ref = iter(make(tmp_path, rank=2, world_size=3))
    batches = [next(ref) for _ in range(8)]
    for cut in (0, 1, 4, 6):
        ds = make(tmp_path, rank=2, world_size=3)
        state = batches[cut]["_data_state"]
        ds.resume = {"consumed": cut + 1, "slots": {str(state["slot"]): state["state"]}}
        it = iter(ds)
        assert [next(it)["keys"] for _ in range(len(batches) - cut - 1)] == [
            b["keys"] for b in batches[cut + 1 :]
        ]
