"""One pass over evaluation shards: each rank, and each of its loader workers, reads its own share.

Samples are numbered across the sources in order; rank ``r`` of ``R`` owns the samples ``g``
with ``g % R == r`` and its worker ``w`` of ``W`` the rank's ``k``-th ones with ``k % W == w``.
Shards are scanned by header, so the media of other shares is never read. Shares are padded to
equal counts with a repeat flagged ``pad`` (not scored): every rank then runs the same number of
(sharded) generation steps, whatever was skipped.

Skips happen inside loader workers, so they travel with the samples (``_skips``: the counts
added since the worker's previous sample) and are summed where the batches arrive.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from mmscene.data.pipeline.mixer import Source, check_sources, prepare_sample
from mmscene.data.shards import indexed_shard
from mmscene.data.tar_reader import EMPTY_SHARD, TRUNCATED_SHARD, Defect, ShardScan, read_shard
from mmscene.scenario import Scenario
from mmscene.skips import SkipCounter

SKIPS_KEY = "_skips"


def shard_sample_count(shard: str) -> tuple[int, Defect | None]:
    """Samples in a shard (from its folder's index, else by scanning its headers), and the defect
    that ends an unindexed shard early (a non-tar, a cut-off member) or leaves it empty."""
    entry = indexed_shard(shard)
    if entry is not None:
        return int(entry["samples"]), None
    scan = ShardScan(shard, wanted=lambda _: False)
    for index, item in scan:
        if isinstance(item, Defect) and item.fatal:
            return index, item
    if not scan.count:
        return 0, Defect(EMPTY_SHARD, f"{shard}: no samples", fatal=True)
    return scan.count, None


def worker_quota(per_rank: int, worker: int, n_workers: int) -> int:
    """How many of a rank's ``per_rank`` positions worker ``worker`` serves (``k % W == w``)."""
    return len(range(worker, per_rank, n_workers))


class EvalSamples(IterableDataset):
    """Encoded samples of this rank's share; ``batch_size`` and ``num_workers`` must be the
    DataLoader's, so that its length (in batches) is exactly what the workers yield."""

    def __init__(
        self,
        sources: list[Source],
        scenarios: dict[str, Scenario],
        encode,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 1,
        num_workers: int = 0,
    ):
        self.sources = sources
        self.shards = check_sources(sources)
        self.scenarios = scenarios
        self.encode = encode
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.num_workers = batch_size, num_workers
        # (source, shard path, index of its first sample across all sources, samples)
        self.layout: list[tuple[Source, str, int, int]] = []
        # shards that end early or hold nothing: counted once, by rank 0's first worker
        self.broken: list[tuple[Source, Defect]] = []
        total = 0
        for source in sources:
            for shard in self.shards[source.name]:
                n, defect = shard_sample_count(shard)
                self.layout.append((source, shard, total, n))
                if defect is not None:
                    self.broken.append((source, defect))
                total += n
        self.total = total
        self.per_rank = -(-total // world_size)

    def __len__(self) -> int:
        # Each worker ends with a partial batch of its own: count whole batches per worker.
        workers = max(1, self.num_workers)
        batches = sum(-(-worker_quota(self.per_rank, w, workers) // self.batch_size) for w in range(workers))
        return batches * self.batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        if n_workers != max(1, self.num_workers):
            raise RuntimeError(f"EvalSamples was built for {self.num_workers} workers, runs in {n_workers}")
        return self._share(worker, n_workers)

    def _mine(self, g: int, worker: int, n_workers: int) -> bool:
        return g % self.world_size == self.rank and (g // self.world_size) % n_workers == worker

    def _share(self, worker: int, n_workers: int) -> Iterator[dict[str, Any]]:
        skips = SkipCounter()
        reported: dict[str, int] = {}
        quota = worker_quota(self.per_rank, worker, n_workers)
        emitted, last = 0, None
        if self.rank == 0 and worker == 0:
            for source, defect in self.broken:
                skips.add(source.name, defect.reason, defect.detail)

        def out(sample: dict[str, Any]) -> dict[str, Any]:
            delta = {k: n - reported.get(k, 0) for k, n in skips.counts.items() if n != reported.get(k, 0)}
            reported.update(skips.counts)
            return {**sample, SKIPS_KEY: delta}

        for source, shard, first, n in self.layout:
            wanted = [i for i in range(n) if self._mine(first + i, worker, n_workers)]
            if not wanted:
                continue
            got = set()
            for index, item in read_shard(shard, wanted=set(wanted).__contains__):
                if index >= n:
                    break  # more samples than the index says: they belong to no share
                got.add(index)
                if isinstance(item, Defect):
                    lost = [i for i in wanted if i >= index] if item.fatal else [index]
                    if lost:
                        skips.add(source.name, item.reason, f"{item.key}: {item.detail}", len(lost))
                    got.update(lost)
                    continue
                item["__shard__"] = shard
                rng = random.Random(f"eval-{item.get('__key__')}")
                sample = prepare_sample(self.scenarios, self.encode, source, item, rng, skips)
                if sample is not None:
                    sample["pad"] = False
                    last = sample
                    emitted += 1
                    yield out(sample)
            missing = [i for i in wanted if i not in got]  # cut off at a tar block boundary
            if missing:
                skips.add(
                    source.name, TRUNCATED_SHARD, f"{shard}: {len(missing)} samples missing", len(missing)
                )
        if last is None and emitted < quota:
            last = self._first_loadable()
        while emitted < quota and last is not None:
            emitted += 1
            yield out(dict(last, pad=True))

    def _first_loadable(self) -> dict[str, Any] | None:
        """Any sample that loads, to pad a share whose own samples were all skipped."""
        quiet = SkipCounter()  # its skips belong to other shares
        for source, shard, _, _ in self.layout:
            for _, item in read_shard(shard):
                if not isinstance(item, Defect):
                    sample = prepare_sample(
                        self.scenarios, self.encode, source, item, random.Random(0), quiet
                    )
                    if sample is not None:
                        return sample
        return None
