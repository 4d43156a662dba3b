"""Evaluation reads each rank's share, split again over loader workers, and its skips arrive."""

import io
import shutil
import tarfile
from functools import partial

import pytest
from torch.utils.data import DataLoader

from mmscene.data import tar_reader
from mmscene.data.ingest.shard_writer import ShardWriter
from mmscene.data.pipeline.encode import ImageGeometry, PromptEncoder
from mmscene.data.pipeline.eval_samples import SKIPS_KEY, EvalSamples, worker_quota
from mmscene.data.pipeline.mixer import Source
from mmscene.registry import get_scenario
from mmscene.train.datamodule import _eval_collate, exit_with_parent, load_tokenizer

SCENARIOS = ("single_image", "multi_image", "video", "3d")


@pytest.fixture(scope="module")
def parts(demo_data):
    tok = load_tokenizer(str(demo_data / "tokenizer"))
    image_token = tok.convert_tokens_to_ids("<image>")
    geometry = ImageGeometry(
        image_size=32, image_token_id=image_token, tokens_per_image=4, tokens_per_pooled_image=1
    )
    encoder = PromptEncoder(tok, geometry)
    sources = [Source(shards=str(demo_data / "val" / s), scenario=s) for s in SCENARIOS]
    scenarios = {s: get_scenario(s, num_frames=2) if s == "video" else get_scenario(s) for s in SCENARIOS}
    return tok, encoder, sources, scenarios


def _dataset(parts, rank, world, batch_size=3, workers=0, sources=None):
    tok, encoder, default_sources, scenarios = parts
    return EvalSamples(
        sources or default_sources,
        scenarios,
        encoder.encode_for_generation,
        rank,
        world,
        batch_size=batch_size,
        num_workers=workers,
    )


def test_shares_cover_every_sample_once_and_read_only_their_own(parts, monkeypatch):
    reads = []
    original = tar_reader.read_located
    monkeypatch.setattr(
        tar_reader, "read_located", lambda path, loc: reads.append(loc.key) or original(path, loc)
    )
    every = [s["key"] for s in _dataset(parts, 0, 1)._share(0, 1)]
    total = len(every)
    assert total == 16 and len(set(every)) == total
    reads.clear()
    seen, counts = [], []
    for rank in range(3):
        ds = _dataset(parts, rank, 3)
        for worker in range(2):
            before = len(reads)
            share = list(ds._share(worker, 2))
            assert len(share) == worker_quota(ds.per_rank, worker, 2)
            real = [s["key"] for s in share if not s["pad"]]
            assert len(reads) - before == len(real)  # media read for its own samples, nothing else
            seen += real
            counts.append(len(share))
    assert sorted(seen) == sorted(every)  # all samples, each exactly once
    assert sum(counts) == 3 * 6  # per rank: ceil(16 / 3) = 6, the short rank padded


def test_loader_workers_yield_the_batches_its_length_promises(parts):
    tok = parts[0]
    keys, lengths = [], []
    for rank in range(2):
        ds = _dataset(parts, rank, 2, batch_size=3, workers=2)
        loader = DataLoader(
            ds,
            batch_size=3,
            num_workers=2,
            collate_fn=partial(_eval_collate, pad_id=tok.pad_token_id),
            worker_init_fn=exit_with_parent,
        )
        batches = list(loader)
        assert len(batches) == len(loader)  # Lightning stops after len(loader) batches
        lengths.append(len(batches))
        keys += [m["key"] for b in batches for m, pad in zip(b["meta"], b["pad"]) if not pad]
    assert lengths[0] == lengths[1]  # ranks run the same number of generation steps
    assert len(keys) == 16 and len(set(keys)) == 16


def _corrupt(shard, victim_suffix):
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    victim = next(m.name for m, _ in members if m.name.endswith(victim_suffix))
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            data = b"garbage" if member.name == victim else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def test_skips_travel_from_workers_with_the_batches(parts, demo_data, tmp_path):
    tok, _, _, _ = parts
    data = tmp_path / "val"
    shutil.copytree(demo_data / "val", data)
    shard = sorted((data / "single_image").glob("*.tar"))[0]
    _corrupt(shard, ".0.png")
    # the 3d samples in one shard, then cut at a tar block boundary: its last sample is gone
    folder = data / "3d"
    samples = [
        item for shard in sorted(folder.glob("*.tar")) for _, item in tar_reader.read_shard(str(shard))
    ]
    shutil.rmtree(folder)
    with ShardWriter(folder, shard_size=100) as writer:
        for sample in samples:
            writer.write(sample["__key__"], [(k, v) for k, v in sample.items() if not k.startswith("__")])
    cut = folder / "shard-000000.tar"
    with tarfile.open(cut) as tar:
        members = tar.getmembers()
    last_key = members[-1].name.split(".")[0]
    first_of_last = next(m for m in members if m.name.split(".")[0] == last_key)
    cut.write_bytes(cut.read_bytes()[: first_of_last.offset])
    with tarfile.open(cut) as tar:
        assert len(tar.getmembers()) < len(members)  # still a valid tar, only shorter
    sources = [Source(shards=str(data / s), scenario=s) for s in SCENARIOS]
    skipped, pads = {}, 0
    for rank in range(2):
        ds = _dataset(parts, rank, 2, batch_size=2, workers=2, sources=sources)
        loader = DataLoader(
            ds, batch_size=2, num_workers=2, collate_fn=partial(_eval_collate, pad_id=tok.pad_token_id)
        )
        for batch in loader:
            pads += sum(batch["pad"])
            for key, n in batch["skips"].items():
                skipped[key] = skipped.get(key, 0) + n
            assert SKIPS_KEY not in batch
    assert skipped == {"single_image/corrupt_media": 1, "3d/truncated_shard": 1}
    assert pads == 2  # the two lost samples' places are padded, not dropped
