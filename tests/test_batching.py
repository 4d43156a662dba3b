"""Token-budget batching: budgets honoured, samples whole, none lost or repeated, exact resume."""

import json
import random

import pytest
import torch
import webdataset as wds

from mmscene.data.pipeline.batching import TokenBudget, parse_batching, plan_batches, row_collate
from mmscene.data.pipeline.collate import pad_collate
from mmscene.data.pipeline.mixer import STATE_KEY, MixedBatches, Source
from mmscene.model.core import IGNORE_INDEX
from mmscene.scenario import Example, Prompt, Scenario, SkipSample

IMG, PAD, T = 99, 0, 4  # image token id, pad id, image positions per image
BAD = {5, 17}  # sample indices of source "a" that fail to load


def shape_of(key: str) -> tuple[int, int]:
    """(images, text tokens) of a sample: a fixed function of its key, for checking batches."""
    rng = random.Random(key)
    return rng.choice([0, 1, 1, 2, 3, 5]), rng.randint(3, 40)


def expected_ids(key: str) -> torch.Tensor:
    n_img, n_text = shape_of(key)
    ids = []
    for _ in range(n_img):
        ids += [7, 8] + [IMG] * T
    return torch.tensor(ids + [9] * n_text)


def write(folder, prefix, n, per_shard):
    folder.mkdir(parents=True)
    for start in range(0, n, per_shard):
        with wds.TarWriter(str(folder / f"shard-{start // per_shard:06d}.tar")) as sink:
            for i in range(start, min(n, start + per_shard)):
                record = {"task": "toy", "bad": prefix == "a" and i in BAD}
                sink.write({"__key__": f"{prefix}{i:04d}", "json": json.dumps(record).encode()})


class Toy(Scenario):
    name = "toy"

    def load(self, sample):
        record = json.loads(sample["json"])
        if record["bad"]:
            raise SkipSample("corrupt_media", sample["__key__"])
        return Example(sample["__key__"], "toy", "toy", [{"role": "user", "content": "q"}], record=record)

    def format(self, example, rng):
        # The answer identifies the draw: formatting randomness is seeded per draw.
        return Prompt(
            example.key, "toy", "toy", example.conversation, [], [], answer=str(rng.getrandbits(62))
        )


def encode(prompt):
    n_img, n_text = shape_of(prompt.key)
    ids = expected_ids(prompt.key)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[-n_text:] = ids[-n_text:]
    index = int(prompt.key[1:]) + (1000 if prompt.key[0] == "b" else 0)
    pixels = torch.zeros(n_img, 3, 2, 2)
    pixels[:, 0] = index  # which sample an image belongs to ...
    pixels[:, 1] = torch.arange(n_img).view(-1, 1, 1).float()  # ... and which of its images it is
    return {
        "input_ids": ids,
        "labels": labels,
        "pixel_values": pixels,
        "image_pooling": torch.zeros(n_img, dtype=bool),
    }


@pytest.fixture
def shards(tmp_path):
    write(tmp_path / "a", "a", 60, 7)
    write(tmp_path / "b", "b", 25, 4)
    return tmp_path


def mixer(root, budget=None, batch_size=4, collate=None):
    sources = [
        Source(shards=str(root / "a" / "*.tar"), scenario="toy", weight=3, name="a"),
        Source(shards=str(root / "b" / "*.tar"), scenario="toy", weight=1, name="b"),
    ]
    if collate is None:
        collate = row_collate(PAD, budget.pack) if budget else (lambda s: pad_collate(s, PAD))
    return MixedBatches(sources, {"toy": Toy()}, encode, collate, batch_size, seed=11, tokens=budget)


def draws_of(batch):
    return [m["answer"] for m in batch["meta"]]


def segments(position_ids_row):
    """(start, length) of every run that restarts at position 0."""
    starts = (position_ids_row == 0).nonzero().flatten().tolist() + [len(position_ids_row)]
    return [(a, b - a) for a, b in zip(starts, starts[1:])]


def check_packed(batch, budget):
    """Rows within budget; every sample whole, in one row, with its own images in order."""
    n_rows, width = batch["input_ids"].shape
    assert width <= budget.row_capacity and n_rows <= budget.rows
    metas = iter(batch["meta"])
    image_cursor = 0
    for r in range(n_rows):
        ended = False
        for start, length in segments(batch["position_ids"][r]):
            ids = batch["input_ids"][r, start : start + length]
            if ended or bool((ids == PAD).all()):
                # row padding: only at the end of a row, never trained on
                assert bool((ids == PAD).all()) and bool(
                    (batch["labels"][r, start : start + length] == IGNORE_INDEX).all()
                )
                ended = True
                continue
            key = next(metas)["key"]
            assert torch.equal(ids, expected_ids(key)), key
            n_img, _ = shape_of(key)
            assert int((ids == IMG).sum()) == n_img * T  # the sample's images are all in this row
            images = batch["pixel_values"][image_cursor : image_cursor + n_img]
            index = int(key[1:]) + (1000 if key[0] == "b" else 0)
            assert bool((images[:, 0] == index).all())
            assert images[:, 1, 0, 0].tolist() == list(range(n_img))
            image_cursor += n_img
    assert next(metas, None) is None and image_cursor == batch["pixel_values"].shape[0]


def reference_draws(root, n):
    """The valid samples in draw order, with their draw index (sample-count mode, one per batch)."""
    it = iter(mixer(root, batch_size=1))
    out = []
    for _ in range(n):
        b = next(it)
        out.append((draws_of(b)[0], b[STATE_KEY]["state"]["draw"] - 1))
    return out, b[STATE_KEY]["state"]


# ------------------------------------------------------------------------------ the plan
def test_plan_takes_the_oldest_and_fills_rows_first_fit_decreasing():
    budget = TokenBudget(max_tokens=20, row_tokens=10, lookahead=8)
    rows = budget.plan([2, 9, 8, 3, 7, 1])
    assert rows[0][0] == 0 and len(rows) == 2
    assert all(sum([2, 9, 8, 3, 7, 1][i] for i in row) <= 10 for row in rows)
    # 9 opens row 2, 8 joins the oldest, 1 tops up row 2: both rows full; 7 and 3 stay buffered
    assert rows == [[0, 2], [1, 5]]


def test_plan_without_packing_groups_similar_lengths():
    budget = TokenBudget(max_tokens=100, pack=False)
    lengths = [30, 5, 31, 6, 29, 7, 28, 90]
    rows = budget.plan(lengths)
    chosen = [i for row in rows for i in row]
    assert chosen == [0, 2, 4]  # 3 x 31 = 93 <= 100; the short ones wait for each other
    assert len(chosen) * max(lengths[i] for i in chosen) <= 100
    rest = [lengths[i] for i in range(len(lengths)) if i not in chosen]
    # 5, 6, 7 together (21 computed for 18 real) beat 5, 7, 28 (84 computed for 40 real)
    assert TokenBudget(max_tokens=100, pack=False).plan(rest) == [[0], [1], [2]]


def test_plan_rejects_samples_longer_than_a_row():
    with pytest.raises(ValueError, match="longer than the row capacity 10"):
        TokenBudget(max_tokens=10).plan([3, 11])


def test_parse_batching_config():
    assert parse_batching(None) is None
    assert parse_batching({"mode": "samples"}) is None
    assert parse_batching({"mode": "tokens", "max_tokens": 512}) == TokenBudget(512, 64, True, None)
    with pytest.raises(ValueError, match="unknown keys \\['max_token'\\]"):
        parse_batching({"mode": "tokens", "max_token": 512})
    with pytest.raises(ValueError, match="needs max_tokens"):
        parse_batching({"mode": "tokens"})
    with pytest.raises(ValueError, match="only apply with mode: tokens"):
        parse_batching({"mode": "samples", "max_tokens": 512})
    with pytest.raises(ValueError, match="row_tokens only applies with pack: true"):
        parse_batching({"mode": "tokens", "max_tokens": 512, "pack": False, "row_tokens": 256})


# ------------------------------------------------------------------------------ the stream
@pytest.mark.parametrize("pack", [True, False])
def test_budget_whole_samples_and_every_draw_exactly_once(shards, pack):
    budget = TokenBudget(max_tokens=256, lookahead=16, pack=pack, row_tokens=128 if pack else None)
    it = iter(mixer(shards, budget))
    emitted = []
    real = computed = 0
    for _ in range(40):
        batch = next(it)
        if pack:
            check_packed(batch, budget)
        else:
            assert batch["input_ids"].numel() <= budget.max_tokens
            for row, meta in zip(batch["input_ids"], batch["meta"]):
                n = len(expected_ids(meta["key"]))
                assert torch.equal(row[:n], expected_ids(meta["key"])) and bool((row[n:] == PAD).all())
        emitted += draws_of(batch)
        real += batch["real_tokens"]
        computed += batch["input_ids"].numel()
    state = batch[STATE_KEY]["state"]
    buffered = state["buffer"]["draws"]
    assert len(emitted) == len(set(emitted))  # no repeats
    assert 0 < len(buffered) < budget.lookahead
    ref, ref_state = reference_draws(shards, len(emitted) + len(buffered))
    assert set(emitted) <= {a for a, _ in ref}
    # everything drawn so far is either emitted or still buffered: nothing skipped
    assert {d for a, d in ref if a not in set(emitted)} == set(buffered)
    assert state["draw"] == ref_state["draw"] and state["streams"] == ref_state["streams"]
    assert (
        state["skips"] == ref_state["skips"]
        and sum(n for k, n in state["skips"].items() if k.endswith("/corrupt_media")) >= 2
    )
    # the buffer beats padding 4 samples to the longest on the same stream
    padded = iter(mixer(shards, batch_size=4))
    pad_real = pad_computed = 0
    for _ in range(len(emitted) // 4):
        b = next(padded)
        pad_real += int(b["attention_mask"].sum())
        pad_computed += b["input_ids"].numel()
    assert real / computed > pad_real / pad_computed + 0.1
    if pack:
        assert real / computed > 0.9


@pytest.mark.parametrize("pack", [True, False])
def test_resume_from_any_batch_continues_the_same_batches(shards, pack):
    budget = TokenBudget(max_tokens=256, lookahead=16, pack=pack, row_tokens=128 if pack else None)
    ref = iter(mixer(shards, budget))
    batches = [next(ref) for _ in range(24)]
    for i in range(len(batches) - 1):
        ds = mixer(shards, budget)
        state = batches[i][STATE_KEY]
        ds.resume = {"consumed": i + 1, "slots": {str(state["slot"]): state["state"]}}
        resumed = iter(ds)
        for expected in batches[i + 1 : i + 6]:
            got = next(resumed)
            assert draws_of(got) == draws_of(expected)
            for name in ("input_ids", "labels", "pixel_values"):
                assert torch.equal(got[name], expected[name]), (i, name)
            if pack:
                assert torch.equal(got["position_ids"], expected["position_ids"])
            assert got[STATE_KEY] == expected[STATE_KEY]


def test_switching_batching_mode_on_resume_loses_nothing(shards):
    budget = TokenBudget(max_tokens=256, lookahead=16, row_tokens=128)
    it = iter(mixer(shards, budget))
    first = [next(it) for _ in range(5)]
    emitted = [d for b in first for d in draws_of(b)]
    ds = mixer(shards, batch_size=4)  # back to sample-count batches
    ds.resume = {"consumed": 5, "slots": {"0": first[-1][STATE_KEY]["state"]}}
    resumed = iter(ds)
    for _ in range(30):
        emitted += draws_of(next(resumed))
    ref = [a for a, _ in reference_draws(shards, len(emitted))[0]]
    assert sorted(emitted) == sorted(ref)


def test_samples_longer_than_a_row_are_counted_and_skipped(shards):
    budget = TokenBudget(max_tokens=30, lookahead=4)
    batch = None
    it = iter(mixer(shards, budget))
    for _ in range(10):
        batch = next(it)
        assert batch["input_ids"].shape[1] <= 30
    skips = batch[STATE_KEY]["state"]["skips"]
    assert sum(n for k, n in skips.items() if k.endswith("/longer_than_max_tokens")) > 0


@pytest.mark.parametrize("pack", [True, False])
def test_plan_batches_matches_the_mixer(shards, pack):
    budget = TokenBudget(max_tokens=256, lookahead=16, pack=pack, row_tokens=128 if pack else None)
    it = iter(mixer(shards, budget))
    batches = [next(it) for _ in range(10)]
    arrivals = iter(mixer(shards, batch_size=1))  # the valid samples in draw order
    ref = [next(arrivals)["meta"][0] for _ in range(200)]
    lengths = [len(expected_ids(m["key"])) for m in ref]
    planned = plan_batches(budget, lengths)[:10]
    for batch, rows in zip(batches, planned):
        assert draws_of(batch) == [ref[i]["answer"] for row in rows for i in row]
