"""The pre-tokenized shard form: ``mmscene data tokenize`` / ``convert --tokenizer`` store each
sample's ids beside its media, and training reads them instead of rendering and tokenizing.

What a user would notice: ids or labels that differ from tokenizing in the loop (a silently
different training), ids kept after the tokenizer or the plugin options changed, shards whose
media or index the rewrite damaged, or a run that says it reads stored ids when it does not.
"""

from __future__ import annotations

import io
import random
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from mmscene.cli import main
from mmscene.data.pipeline import pretokenized
from mmscene.data.pipeline.batching import TokenBudget, row_collate
from mmscene.data.pipeline.encode import ImageGeometry, PromptEncoder, load_tokenizer
from mmscene.data.pipeline.mixer import MixedBatches, Source
from mmscene.data.shards import INDEX_NAME
from mmscene.data.tar_reader import read_shard
from mmscene.data.tools.local_tokenizer import train_tokenizer
from mmscene.data.tools.pretokenize import TokenizeSpec, tokenize_folders
from mmscene.registry import get_scenario
from mmscene.scenario import Example, Prompt, Scenario

SCENARIOS = ("single_image", "multi_image", "video", "3d")
OPTIONS = {
    "multi_image": {"placement": "mixed", "front_prob": 0.5},
    "video": {"num_frames": 3},
    "3d": {"num_views": 2, "view_size": 32},
}
GEOMETRY = ImageGeometry(image_size=48, image_token_id=3, tokens_per_image=9, tokens_per_pooled_image=4)


def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


@pytest.fixture
def tokenized(demo_data, tmp_path):
    """A copy of the demo's training shards, pre-tokenized with the demo tokenizer and OPTIONS."""
    train = tmp_path / "train"
    shutil.copytree(demo_data / "train", train)
    spec = TokenizeSpec(str(demo_data / "tokenizer"), scenarios=OPTIONS)
    reports = tokenize_folders([(sorted(map(str, (train / s).glob("*.tar"))), s) for s in SCENARIOS], spec)
    return train, reports


class CountingTokenizer:
    """The tokenizer, counting the calls that render or tokenize text."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        self.calls += 1
        return self.inner.apply_chat_template(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _samples(train: Path, scenario: str):
    for path in sorted((train / scenario).glob("*.tar")):
        for _, sample in read_shard(str(path)):
            yield sample


@pytest.mark.parametrize("max_length", [None, 60])
def test_stored_ids_equal_the_loop_ids(tokenized, demo_data, max_length):
    train, _ = tokenized
    tokenizer = load_tokenizer(str(demo_data / "tokenizer"))
    loop = PromptEncoder(tokenizer, GEOMETRY, max_length=max_length)
    counting = CountingTokenizer(tokenizer)
    stored = PromptEncoder(counting, GEOMETRY, max_length=max_length)
    assert stored.fingerprint == loop.fingerprint  # computed before counting starts
    counting.calls = 0
    compared, refused, placements = 0, 0, set()
    for scenario in SCENARIOS:
        plugin = get_scenario(scenario, **OPTIONS.get(scenario, {}))
        for sample in _samples(train, scenario):
            example = plugin.load(sample)
            for seed in range(6):
                prompt = plugin.format(example, random.Random(seed))
                placements.add(prompt.meta.get("placement"))
                try:
                    want = loop.encode(prompt)
                except Exception as err:  # noqa: BLE001 - the stored path must refuse it alike
                    with pytest.raises(type(err)):
                        stored.encode(prompt, stored=sample[pretokenized.MEMBER])
                    refused += 1
                    continue
                got = stored.encode(prompt, stored=sample[pretokenized.MEMBER])
                assert torch.equal(got["input_ids"], want["input_ids"]), (scenario, seed)
                assert torch.equal(got["labels"], want["labels"]), (scenario, seed)
                assert torch.equal(got["pixel_values"], want["pixel_values"])
                assert got["image_positions"] == want["image_positions"]
                assert got["pretokenized"] and not want["pretokenized"]
                compared += 1
    assert placements >= {"front", "interleaved"}  # both multi-image formats were compared
    assert compared + refused == 4 * 16 * 6
    assert (refused == 0) if max_length is None else (compared > 50 and refused > 0)
    assert counting.calls == 0  # nothing was rendered or tokenized on the stored path
    assert set(stored.stored_counts) == {"hit"}


def test_trimming_applies_to_stored_turns(demo_data):
    """A stored two-exchange sample longer than max_length loses its last exchange, as in the loop."""
    tokenizer = load_tokenizer(str(demo_data / "tokenizer"))
    plugin = get_scenario("single_image")
    example = plugin.load(next(_samples(demo_data / "train", "single_image")))
    example.conversation = [
        *example.conversation,
        *({"role": r, "content": f"and then? {r}"} for r in ("user", "assistant")),
    ]
    prompt = plugin.format(example, random.Random(0))
    encoder = PromptEncoder(tokenizer, GEOMETRY)
    key, turns = encoder.stored_form(prompt)
    member = pretokenized.dump(encoder.fingerprint, {key: turns})
    full = encoder.encode(prompt)["input_ids"]
    limit = len(full) - 1
    want = PromptEncoder(tokenizer, GEOMETRY, max_length=limit).encode(prompt)
    got = PromptEncoder(tokenizer, GEOMETRY, max_length=limit).encode(prompt, stored=member)
    assert got["pretokenized"] and len(got["input_ids"]) < len(full)
    assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["labels"], want["labels"])


def test_another_tokenizer_or_other_options_tokenize_in_the_loop(tokenized, demo_data, caplog):
    train, _ = tokenized
    tokenizer = load_tokenizer(str(demo_data / "tokenizer"))
    other = train_tokenizer(["a tokenizer trained on other text, so ids differ"] * 20, vocab_size=300)
    other.pad_token = "<|endoftext|>"
    video = get_scenario("video", num_frames=2)  # the shards were tokenized with 3 frames
    cases = [
        (PromptEncoder(other, GEOMETRY), get_scenario("single_image"), "single_image", "stale"),
        (
            PromptEncoder(tokenizer, GEOMETRY, system_prompt="Answer briefly."),
            get_scenario("3d", **OPTIONS["3d"]),
            "3d",
            "miss",
        ),
        (PromptEncoder(tokenizer, GEOMETRY), video, "video", "miss"),
    ]
    for encoder, plugin, scenario, outcome in cases:
        reference = PromptEncoder(encoder.tokenizer, GEOMETRY, system_prompt=encoder.system_prompt)
        n = 0
        with caplog.at_level("WARNING", logger="mmscene.data.pipeline.encode"):
            caplog.clear()
            for sample in _samples(train, scenario):
                prompt = plugin.format(plugin.load(sample), random.Random(0))
                got = encoder.encode(prompt, stored=sample["tokens.json"])
                assert torch.equal(got["input_ids"], reference.encode(prompt)["input_ids"])
                assert not got["pretokenized"]
                n += 1
        assert dict(encoder.stored_counts) == {outcome: n}, scenario
        assert len(caplog.records) == 1 and outcome in caplog.records[0].getMessage()  # once, not per sample


def test_a_broken_member_is_ignored(demo_data):
    tokenizer = load_tokenizer(str(demo_data / "tokenizer"))
    encoder = PromptEncoder(tokenizer, GEOMETRY)
    image = get_scenario("single_image")
    sample = next(_samples(demo_data / "train", "single_image"))
    prompt = image.format(image.load(sample), random.Random(0))
    key, turns = encoder.stored_form(prompt)
    good = pretokenized.dump(encoder.fingerprint, {key: turns})
    no_image = pretokenized.dump(
        encoder.fingerprint, {key: [([t for t in ids if t >= 0], span) for ids, span in turns]}
    )
    want = encoder.encode(prompt)["input_ids"]
    for member in (b"{not json", no_image, good[:-5]):
        assert torch.equal(encoder.encode(prompt, stored=member)["input_ids"], want)
    assert encoder.stored_counts["bad"] == 3
    assert encoder.encode(prompt, stored=good)["pretokenized"]


def test_rewrite_keeps_every_member_and_updates_the_index(tokenized, demo_data):
    train, reports = tokenized
    assert all(not r.left_as_is for r in reports)
    assert sum(r.tokenized for r in reports) == 4 * 16
    multi = sum(r.variants for r in reports if "/multi_image/" in r.shard)
    assert multi == 2 * sum(r.tokenized for r in reports if "/multi_image/" in r.shard)  # front + interleaved
    for scenario in SCENARIOS:
        for path in sorted((demo_data / "train" / scenario).glob("*.tar")):
            before = _members(path)
            after = _members(train / scenario / path.name)
            assert [m for m in after if not m[0].endswith(".tokens.json")] == before
            keys = {name.split(".")[0] for name, _ in before}
            assert {n.split(".")[0] for n, _ in after if n.endswith(".tokens.json")} == keys
        index = yaml.safe_load((train / scenario / INDEX_NAME).read_text())["shards"]
        original = yaml.safe_load((demo_data / "train" / scenario / INDEX_NAME).read_text())["shards"]
        for name, entry in index.items():
            assert entry["samples"] == original[name]["samples"]
            assert entry["bytes"] == (train / scenario / name).stat().st_size
    # a second run replaces the member: the same bytes, not a second member
    first = {p: p.read_bytes() for p in train.rglob("*.tar")}
    spec = TokenizeSpec(str(demo_data / "tokenizer"), scenarios=OPTIONS)
    tokenize_folders([(sorted(map(str, (train / "video").glob("*.tar"))), "video")], spec)
    assert all(p.read_bytes() == data for p, data in first.items())


def test_skipped_samples_and_damaged_shards(demo_data, tmp_path, capsys):
    """A sample its plugin skips keeps no member (and is counted); a damaged shard is left as it was."""
    folder = tmp_path / "single_image"
    shutil.copytree(demo_data / "train" / "single_image", folder)
    first, second = sorted(folder.glob("*.tar"))[:2]
    members = _members(first)
    with tarfile.open(first, "w", format=tarfile.PAX_FORMAT) as tar:
        for i, (name, data) in enumerate(members):
            if name.endswith(".png") and i < 3:
                data = b"not an image"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(second) as tar:
        offsets = [m.offset_data for m in tar]
    cut_in_member = second.read_bytes()[: offsets[4] + 10]
    second.write_bytes(cut_in_member)
    third = sorted(folder.glob("*.tar"))[2]
    with tarfile.open(third) as tar:
        headers = [m.offset for m in tar]
    at_block_boundary = third.read_bytes()[: headers[4]] + bytes(1024)  # a clean tar, two samples short
    third.write_bytes(at_block_boundary)
    code = main(["data", "tokenize", str(folder), "--tokenizer", str(demo_data / "tokenizer")])
    assert code == 1  # not every shard could be rewritten
    assert second.read_bytes() == cut_in_member and third.read_bytes() == at_block_boundary
    said = capsys.readouterr().out
    assert f"left as it was: {second}" in said and f"left as it was: {third}" in said
    assert "2 of the 4 samples its index lists" in said and "corrupt_media 1" in said
    after = _members(first)
    stored = [n for n, _ in after if n.endswith(".tokens.json")]
    assert len(stored) == len({n.split(".")[0] for n, _ in members}) - 1
    assert not list(folder.glob("*.part"))


def test_batches_from_stored_ids_equal_batches_from_the_loop(tokenized, demo_data):
    """Packed training batches, from the same seed: identical tensors, and counted as pre-tokenized."""
    train, _ = tokenized
    tokenizer = load_tokenizer(str(demo_data / "tokenizer"))
    scenarios = {s: get_scenario(s, **OPTIONS.get(s, {})) for s in SCENARIOS}
    budget = TokenBudget(max_tokens=512, lookahead=8, pack=True)

    def batches(root: Path, n: int = 6):
        encoder = PromptEncoder(tokenizer, GEOMETRY, max_length=512)
        sources = [Source(shards=str(root / s), scenario=s) for s in SCENARIOS]
        stream = MixedBatches(
            sources,
            scenarios,
            encoder.encode,
            row_collate(tokenizer.pad_token_id, True),
            4,
            seed=5,
            tokens=budget,
        )
        it = iter(stream)
        return [next(it) for _ in range(n)]

    for got, want in zip(batches(train), batches(demo_data / "train"), strict=True):
        for key in ("input_ids", "labels", "pixel_values", "position_ids"):
            if key in want:
                assert torch.equal(got[key], want[key]), key
        assert got["pretokenized"] == len(got["meta"]) and want["pretokenized"] == 0


class ThreeWays(Scenario):
    """A formatter with three random phrasings, listing none of them."""

    name = "three_ways"

    def format(self, example: Example, rng: random.Random) -> Prompt:
        phrase = rng.choice(["Look.", "See.", "Watch."])
        conversation = [{"role": "user", "content": phrase}, {"role": "assistant", "content": "ok"}]
        return self.prompt(example, conversation, [], [])


def test_prompt_variants(demo_data):
    example = Example("k", "three_ways", "t", [])
    texts = {p.conversation[0]["content"] for p in ThreeWays().prompt_variants(example)}
    assert texts == {"Look.", "See.", "Watch."}  # the default draws them all
    sample = next(s for s in _samples(demo_data / "train", "multi_image"))
    for placement, want in (
        ("mixed", ["front", "interleaved"]),
        ("front", ["front"]),
        ("interleaved", ["interleaved"]),
    ):
        plugin = get_scenario("multi_image", placement=placement)
        variants = plugin.prompt_variants(plugin.load(sample))
        assert [p.meta["placement"] for p in variants] == want


def test_convert_with_a_tokenizer_stores_ids(demo_data, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump({"data": {"tokenizer": str(demo_data / "tokenizer"), "scenarios": OPTIONS}})
    )
    out = tmp_path / "shards"
    code = main(
        [
            "data",
            "convert",
            str(demo_data / "raw" / "val.jsonl"),
            "--media-root",
            str(demo_data / "raw" / "media"),
            "--out",
            str(out),
            "--config",
            str(config),
            "--no-progress",
        ]
    )
    assert code == 0
    tars = sorted(out.rglob("*.tar"))
    assert tars
    for path in tars:
        names = [n for n, _ in _members(path)]
        assert sum(n.endswith(".tokens.json") for n in names) == len({n.split(".")[0] for n in names})


def test_workers_write_the_same_shards(tokenized, demo_data, tmp_path):
    train, _ = tokenized
    again = tmp_path / "again"
    shutil.copytree(demo_data / "train", again)
    spec = TokenizeSpec(str(demo_data / "tokenizer"), scenarios=OPTIONS)
    tokenize_folders([(sorted(map(str, (again / s).glob("*.tar"))), s) for s in SCENARIOS], spec, workers=2)
    for path in sorted(train.rglob("*.tar")):
        assert (again / path.relative_to(train)).read_bytes() == path.read_bytes(), path


def test_bad_requests_are_refused(demo_data, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"train": [{"shards": str(empty), "scenario": "video"}]}}))
    assert main(["data", "tokenize", "--config", str(config)]) == 2
    assert "data.tokenizer is not set" in capsys.readouterr().out
    assert main(["data", "tokenize", str(empty), "--tokenizer", str(demo_data / "tokenizer")]) == 2
    assert "holds no shards" in capsys.readouterr().out
    config.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "tokenizer": str(demo_data / "tokenizer"),
                    "train": [{"shards": str(empty / "x-*.tar"), "scenario": "video"}],
                }
            }
        )
    )
    assert main(["data", "tokenize", "--config", str(config)]) == 2
    assert "no shards match" in capsys.readouterr().out
    assert main(["data", "tokenize", str(demo_data / "train")]) == 2
    assert "give --config X.yaml or --tokenizer DIR" in capsys.readouterr().out
