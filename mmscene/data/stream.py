"""Resumable raw-sample streams over WebDataset shards, one per (source, rank, worker) slice.

Every slice reads a disjoint part of a source: whole shards when there are at least as many
shards as slices, else every n-th sample of each shard (so 1 shard still feeds 8 workers). A
stream never ends: it starts a new epoch with a fresh seeded shard order, so every rank can
produce as many batches as the trainer asks for and no rank waits on another.

The state is declarative — ``(epoch, shard cursor, sample cursor)`` — so a resumed stream
re-opens its shard and skips the samples it had already read (without decoding them).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import webdataset as wds

from mmscene.data.seeds import SHARD_ORDER, rng_for

log = logging.getLogger(__name__)


def expand_shards(pattern: str | list[str]) -> list[str]:
    """Shard paths from a glob, a brace pattern (``shard-{000000..000009}.tar``), a folder or a list."""
    patterns = pattern if isinstance(pattern, list) else [pattern]
    out: list[str] = []
    for pat in patterns:
        path = Path(pat)
        if path.is_dir():
            out += sorted(str(p) for p in path.rglob("*.tar"))
            continue
        for expanded in wds.shardlists.expand_urls(str(pat)):
            matches = sorted(glob.glob(expanded))
            out += matches if matches else ([expanded] if Path(expanded).is_file() else [])
    return out


@dataclasses.dataclass
class StreamState:
    epoch: int = 0
    shard_cursor: int = 0  # index into this epoch's shard order
    sample_cursor: int = 0  # raw samples already read from the current shard
    yielded: bool = False  # whether this epoch gave this slice anything so far
    # A slice that got nothing from sample-level splitting (tiny shards) reads every sample
    # from then on rather than starving its rank.
    fallback: bool = False
    empty_epochs: int = 0


class ShardStream:
    """An endless iterator of raw samples (``{"__key__", "json", "<ext>": bytes}``) for one slice."""

    def __init__(
        self,
        shards: list[str],
        slice_id: int,
        n_slices: int,
        seed: int,
        name: str,
        skips=None,
        shuffle: bool = True,
    ):
        if not shards:
            raise ValueError(f"source {name!r} has no shards")
        self.name = name
        self.seed = seed
        self.skips = skips
        self.shuffle = shuffle
        self.by_sample = len(shards) < n_slices
        self.shards = list(shards) if self.by_sample else list(shards[slice_id::n_slices])
        self.slice_id, self.n_slices = slice_id, n_slices
        self.state = StreamState()

    def _order(self, epoch: int) -> list[str]:
        order = list(self.shards)
        if self.shuffle:
            rng_for(SHARD_ORDER, self.seed, self.name, self.slice_id, epoch).shuffle(order)
        return order

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = StreamState(**state)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._samples()

    def _samples(self) -> Iterator[dict[str, Any]]:
        while True:
            order = self._order(self.state.epoch)
            while self.state.shard_cursor < len(order):
                shard = order[self.state.shard_cursor]
                for index, sample in self._read_shard(shard, self.state.sample_cursor):
                    self.state.sample_cursor = index + 1
                    if self.by_sample and index % self.n_slices != self.slice_id and not self.state.fallback:
                        continue
                    self.state.yielded = True
                    sample["__shard__"] = shard
                    yield sample
                self.state.shard_cursor += 1
                self.state.sample_cursor = 0
            done = self.state
            empty = 0 if done.yielded else done.empty_epochs + 1
            if empty >= 2:
                raise RuntimeError(f"source {self.name!r}: no readable samples in {len(self.shards)} shards")
            fallback = done.fallback or (not done.yielded and self.by_sample)
            self.state = StreamState(epoch=done.epoch + 1, fallback=fallback, empty_epochs=empty)

    def _read_shard(self, shard: str, start: int) -> Iterator[tuple[int, dict[str, Any]]]:
        try:
            with open(shard, "rb") as stream:
                files = ({**f, "__url__": shard} for f in wds.tariterators.tar_file_iterator(stream))
                for index, sample in enumerate(wds.tariterators.group_by_keys(files)):
                    if index >= start:
                        yield index, sample
        except (OSError, tarfile.TarError, ValueError) as err:
            # A truncated or unreadable shard must not end a multi-day run: count it, move on.
            log.warning("skipping the rest of shard %s: %s", shard, err)
            if self.skips is not None:
                self.skips.add(self.name, "corrupt_shard", f"{shard}: {err}")
