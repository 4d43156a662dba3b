"""Resumable raw-sample streams over WebDataset shards, one per (source, rank, worker) slice.

Every slice reads a disjoint part of a source: whole shards when there are at least as many
shards as slices, else every n-th sample of each shard (so 1 shard still feeds 8 workers). A
stream never ends: it starts a new epoch with a fresh seeded shard order, so every rank can
produce as many batches as the trainer asks for and no rank waits on another.

Samples pass through a bounded shuffle buffer, because annotation files group each
sub-dataset's samples together and shard order alone leaves long runs of one of them. The buffer
holds *where* samples lie (shard, index, member offsets), not their bytes: memory stays small
whatever the media, and a sample is read when it is picked.

The state is declarative, as Megatron-Energon's: the scan position ``(epoch, shard cursor,
sample cursor)``, the pick counter and the buffer as restore keys ``[shard, index]``. A resumed
stream re-scans the headers of the shards its keys name and goes on from the same position.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import webdataset as wds

from mmscene.data.seeds import SHARD_ORDER, SHUFFLE, rng_for
from mmscene.data.shards import indexed_shard
from mmscene.data.tar_reader import EMPTY_SHARD, TRUNCATED_SHARD, Located, ShardScan, read_located

DEFAULT_SHUFFLE_BUFFER = 1000
MAX_CACHED_LOCATIONS = 100_000  # per stream: about 10 MB of shard locations

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
    sample_cursor: int = 0  # samples of the current shard already scanned
    yielded: bool = False  # whether this epoch gave this slice anything so far
    # A slice that got nothing from sample-level splitting (tiny shards) reads every sample
    # from then on rather than starving its rank.
    fallback: bool = False
    empty_epochs: int = 0
    picks: int = 0  # samples handed out so far (seeds the next pick from the buffer)


class ShardStream:
    """An endless iterator of raw samples (``{"__key__", "json", "<ext>": bytes}``) for one slice.

    ``buffer_size`` samples are held (as locations) and handed out in a seeded random order;
    ``shuffle=False`` gives shards and samples in order (evaluation).
    """

    def __init__(
        self,
        shards: list[str],
        slice_id: int,
        n_slices: int,
        seed: int,
        name: str,
        skips=None,
        shuffle: bool = True,
        buffer_size: int = DEFAULT_SHUFFLE_BUFFER,
    ):
        if not shards:
            raise ValueError(f"source {name!r} has no shards")
        if buffer_size < 0:
            raise ValueError(f"source {name!r}: shuffle buffer size must be >= 0, got {buffer_size}")
        self.name = name
        self.seed = seed
        self.skips = skips
        self.shuffle = shuffle
        self.buffer_size = buffer_size if shuffle else 0
        self.by_sample = len(shards) < n_slices
        self.shards = list(shards) if self.by_sample else list(shards[slice_id::n_slices])
        self.slice_id, self.n_slices = slice_id, n_slices
        self.state = StreamState()
        # ((shard, index), location): the key tuple is made once, so that a state snapshot (taken
        # before every draw) copies one list of references, not a thousand new pairs
        self._buffer: list[tuple[tuple[int, int], Located]] = []
        # (shard, fallback, file identity) -> its locations, for shards that read clean
        self._scans: dict[tuple, list[tuple[int, Located]]] = {}
        self._cached = 0  # locations held in _scans
        self._clean = False

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.shards)))
        if self.shuffle:
            rng_for(SHARD_ORDER, self.seed, self.name, self.slice_id, epoch).shuffle(order)
        return order

    def state_dict(self) -> dict[str, Any]:
        # the buffer's restore keys [shard id, sample index] come with the scan position
        return {**dataclasses.asdict(self.state), "buffer": [key for key, _ in self._buffer]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = StreamState(**{k: v for k, v in state.items() if k != "buffer"})
        # restored now, not when iteration starts: state_dict() must give the keys back unchanged
        self._buffer = self._restore(state.get("buffer", []))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._samples()

    def _skip(self, reason: str, detail: str, n: int = 1) -> None:
        if self.skips is not None and n > 0:
            self.skips.add(self.name, reason, detail, n)

    def _samples(self) -> Iterator[dict[str, Any]]:
        scanned = self._scan()
        while True:
            while len(self._buffer) < max(1, self.buffer_size):
                shard, index, located = next(scanned)
                self._buffer.append(((shard, index), located))
            if self.buffer_size > 1:
                pick = rng_for(SHUFFLE, self.seed, self.name, self.slice_id, self.state.picks)
                j = pick.randrange(len(self._buffer))
                self._buffer[j], self._buffer[-1] = self._buffer[-1], self._buffer[j]
            (shard, index), located = self._buffer.pop()
            self.state.picks += 1
            path = self.shards[shard]
            try:
                sample = read_located(path, located)
            except OSError as err:  # the shard changed or vanished since it was scanned
                self._skip(TRUNCATED_SHARD, str(err))
                continue
            sample["__shard__"] = path
            sample["__index__"] = index
            yield sample

    def _restore(self, keys: list) -> list[tuple[tuple[int, int], Located]]:
        """Locations of the buffered samples, found again by scanning their shards' headers."""
        wanted: dict[int, set[int]] = {}
        for shard, index in keys:
            wanted.setdefault(shard, set()).add(index)
        found: dict[tuple[int, int], Located] = {}
        for shard, indices in wanted.items():
            for index, item in ShardScan(self.shards[shard], min(indices), indices.__contains__):
                if isinstance(item, Located):
                    found[shard, index] = item
        lost = [tuple(k) for k in keys if tuple(k) not in found]
        if lost:
            log.warning(
                "source %r: %d buffered samples are gone from their shards; resume is not exact",
                self.name,
                len(lost),
            )
        keys = [(int(shard), int(index)) for shard, index in keys]  # lists after a JSON round trip
        return [(key, found[key]) for key in keys if key in found]

    def _scan(self) -> Iterator[tuple[int, int, Located]]:
        """Sample locations in stream order; advances the scan position in ``self.state``."""
        while True:
            order = self._order(self.state.epoch)
            while self.state.shard_cursor < len(order):
                shard = order[self.state.shard_cursor]
                for index, located in self._scan_shard(shard, self.state.sample_cursor):
                    self.state.sample_cursor = index + 1
                    self.state.yielded = True
                    yield shard, index, located
                self.state.shard_cursor += 1
                self.state.sample_cursor = 0
            done = self.state
            empty = 0 if done.yielded else done.empty_epochs + 1
            if empty >= 2:
                raise RuntimeError(f"source {self.name!r}: no readable samples in {len(self.shards)} shards")
            fallback = done.fallback or (not done.yielded and self.by_sample)
            self.state = dataclasses.replace(
                done,
                epoch=done.epoch + 1,
                shard_cursor=0,
                sample_cursor=0,
                yielded=False,
                fallback=fallback,
                empty_epochs=empty,
            )

    def _mine(self, index: int) -> bool:
        return not self.by_sample or self.state.fallback or index % self.n_slices == self.slice_id

    def _scan_shard(self, shard: int, start: int) -> Iterator[tuple[int, Located]]:
        """This slice's samples of one shard; defects and samples missing from it are counted.

        A clean shard's locations are kept (up to :data:`MAX_CACHED_LOCATIONS` per stream), so
        later epochs read no tar headers again while the file is unchanged: a small source with a
        large shuffle buffer goes round its shards several times to fill it."""
        path = self.shards[shard]
        key = (shard, self.state.fallback, _file_id(path))
        cached = self._scans.get(key)
        if cached is not None:
            yield from ((index, located) for index, located in cached if index >= start)
            return
        found: list[tuple[int, Located]] = []
        for index, located in self._read_headers(shard, start):
            found.append((index, located))
            yield index, located
        fits = self._cached + len(found) <= MAX_CACHED_LOCATIONS
        if start == 0 and self._clean and key[2] is not None and fits:
            self._scans[key] = found
            self._cached += len(found)

    def _read_headers(self, shard: int, start: int) -> Iterator[tuple[int, Located]]:
        """The scan of one shard from its tar headers; ``self._clean`` says whether it found no
        defect at all."""
        path = self.shards[shard]
        self._clean = False
        try:
            entry = indexed_shard(path)
        except ValueError as err:
            log.warning("%s; not checking %s for missing samples", err, path)
            entry = None
        expected = entry["samples"] if entry else None
        scan = ShardScan(path, start, self._mine)
        for index, item in scan:
            if isinstance(item, Located):
                yield index, item
                continue
            self.state.sample_cursor = index + 1
            if not item.fatal:
                self._skip(item.reason, f"{item.key}: {item.detail}")
                continue
            lost = self._lost(index, expected) if expected is not None else 1
            self._skip(item.reason, f"{item.detail} ({lost} samples lost)", max(1, lost))
            return
        if scan.count == 0 and start == 0:
            self._skip(EMPTY_SHARD, f"{path}: a tar without samples")
        if expected is not None and scan.count is not None and scan.count != expected:
            if scan.count < expected:  # cut at a tar block boundary: reads as a clean, shorter tar
                lost = self._lost(max(start, scan.count), expected)
                self._skip(TRUNCATED_SHARD, f"{path}: {scan.count} of {expected} samples", lost)
            else:
                log.warning("%s holds %d samples, its index says %d", path, scan.count, expected)
            return
        self._clean = scan.count is not None and scan.count > 0

    def _lost(self, first: int, expected: int) -> int:
        return sum(1 for i in range(first, expected) if self._mine(i))


def _file_id(path: str) -> tuple[int, int] | None:
    """Size and modification time: a shard rewritten since it was scanned is scanned again."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns
