"""The scenario mixer: weighted draws from sources, per rank and worker, batch by batch.

Each DataLoader worker ("slot") owns one slice of every source. Which source feeds the next
sample is a pure function of ``(seed, rank, slot, draw)``, and formatting randomness (in-front
vs interleaved placement) is another, independent one (:mod:`mmscene.data.seeds`), so a slot's
future depends only on its
declarative state: the draw counter and its streams' cursors. Every batch carries that state;
the data module keeps the last state of each slot that the trainer consumed and resumes from it.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from bisect import bisect_right
from collections.abc import Callable, Iterator
from itertools import accumulate
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from mmscene.data.pipeline import pretokenized
from mmscene.data.pipeline.batching import TokenBudget
from mmscene.data.pipeline.stream import DEFAULT_SHUFFLE_BUFFER, ShardStream, expand_shards
from mmscene.data.seeds import FORMAT, SOURCE, rng_for
from mmscene.data.shards import indexed_shard
from mmscene.scenario import Scenario, SkipSample
from mmscene.skips import SkipCounter

log = logging.getLogger(__name__)
STATE_KEY = "_data_state"


@dataclasses.dataclass
class Source:
    """One weighted stream of shards handled by one scenario plugin."""

    shards: str | list[str]
    scenario: str
    weight: float = 1.0
    name: str | None = None

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"source {self.name or self.shards!r}: weight must be > 0, got {self.weight}")
        if self.name is None:
            self.name = self.scenario


def check_sources(sources: list[Source]) -> dict[str, list[str]]:
    names = [s.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"source names must be unique; repeated: {dupes} (set `name:` on each source)")
    found = {}
    for s in sources:
        shards = expand_shards(s.shards)
        if not shards:
            raise FileNotFoundError(f"source {s.name!r}: no shards match {s.shards!r}")
        for shard in shards:
            indexed_shard(shard)  # a broken shard index is a broken dataset: say so at start
        found[s.name] = shards
    return found


@dataclasses.dataclass
class _Pending:
    """A buffered sample, its draw index and every stream's state just before it was drawn."""

    draw: int
    sample: dict[str, Any]
    streams: dict[str, dict[str, Any]]


class _StreamStates:
    """Every stream's ``state_dict()``, refreshed for the one stream a draw advanced: a draw
    reads one stream, so snapshotting all of them (buffers of restore keys) per draw is waste."""

    def __init__(self, streams: dict[str, ShardStream]):
        self.streams = streams
        self.now = {name: s.state_dict() for name, s in streams.items()}

    def advanced(self, name: str) -> None:
        self.now = {**self.now, name: self.streams[name].state_dict()}  # earlier snapshots stay as they were


class WeightedChoice:
    """Source index for draw ``d``: stateless, so a resumed slot continues the same sequence."""

    def __init__(self, weights: list[float], seed: int, rank: int, slot: int):
        total = sum(weights)
        self.cum = list(accumulate(w / total for w in weights))
        self.key = (seed, rank, slot)

    def __call__(self, draw: int) -> int:
        u = rng_for(SOURCE, *self.key, draw).random()
        return min(bisect_right(self.cum, u), len(self.cum) - 1)


class MixedBatches(IterableDataset):
    """Endless batches mixed from all sources; ``encode`` turns a Prompt into tensors."""

    def __init__(
        self,
        sources: list[Source],
        scenarios: dict[str, Scenario],
        encode: Callable[[Any], dict[str, Any]],
        collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        tokens: TokenBudget | None = None,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    ):
        """``tokens`` switches to token-budget batches (``collate(samples, rows)``, see
        :mod:`mmscene.data.pipeline.batching`); else batches of ``batch_size`` samples (``collate(samples)``).
        ``shuffle_buffer`` is the number of samples each stream shuffles among (0 or 1: in order)."""
        self.sources = sources
        self.shards = check_sources(sources)
        self.scenarios = scenarios
        self.encode = encode
        self.collate = collate
        self.batch_size = batch_size
        self.tokens = tokens
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.resume: dict[str, Any] | None = None  # {"consumed": n, "slots": {slot: state}}
        # Skips are counted and training goes on, but a stream that yields nothing usable is a
        # broken dataset or config, not bad luck: stop with the counts instead of spinning.
        self.max_consecutive_skips = 10_000

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        offset = self.resume["consumed"] % n_workers if self.resume else 0
        # The trainer consumes slots round-robin from worker 0; after a resume the slot that
        # was due next must be served first, so worker w takes over slot (offset + w).
        slot = (offset + worker) % n_workers
        saved = (self.resume or {}).get("slots", {}).get(str(slot))
        return self._batches(slot, n_workers, saved)

    def _batches(self, slot: int, n_slots: int, saved: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
        slice_id, n_slices = self.rank * n_slots + slot, self.world_size * n_slots
        skips = SkipCounter()
        streams = {
            s.name: ShardStream(
                self.shards[s.name],
                slice_id,
                n_slices,
                self.seed,
                s.name,
                skips,
                buffer_size=self.shuffle_buffer,
            )
            for s in self.sources
        }
        choose = WeightedChoice([s.weight for s in self.sources], self.seed, self.rank, slot)
        draw = 0
        buffer: list[_Pending] = []
        if saved is not None:
            draw = saved["draw"]
            pending = saved.get("buffer")
            # Buffered samples are rebuilt by re-reading the streams from where the oldest of them
            # was drawn: the state stays declarative and the buffer comes back exactly.
            for name, state in (pending["streams"] if pending else saved["streams"]).items():
                streams[name].load_state_dict(state)
        iters = {name: iter(stream) for name, stream in streams.items()}
        if saved is not None:
            if pending:
                buffer = self._replay(pending, draw, slot, streams, iters, choose)
                moved = {name: s.state_dict() for name, s in streams.items()}
                if moved != saved["streams"]:
                    log.warning(
                        "rank %s slot %s: the shards changed since the checkpoint; resume is not exact",
                        self.rank,
                        slot,
                    )
            skips.load_state_dict(saved["skips"])
        budget = self.tokens
        target = budget.lookahead if budget else self.batch_size
        in_a_row = 0
        states = _StreamStates(streams)
        while True:
            while len(buffer) < target:
                before = states.now
                source = self.sources[choose(draw)]
                draw += 1
                raw = next(iters[source.name])
                states.advanced(source.name)
                rng = rng_for(FORMAT, self.seed, self.rank, slot, draw - 1)
                sample = self._prepare(source, raw, rng, skips)
                if sample is not None and budget and len(sample["input_ids"]) > budget.row_capacity:
                    skips.add(
                        source.name,
                        "longer_than_max_tokens",
                        f"{raw.get('__key__')}: {len(sample['input_ids'])} tokens > {budget.row_capacity}",
                    )
                    sample = None
                if sample is not None:
                    buffer.append(_Pending(draw - 1, sample, before))
                    in_a_row = 0
                    continue
                in_a_row += 1
                if in_a_row >= self.max_consecutive_skips:
                    raise RuntimeError(
                        f"{in_a_row} samples in a row were skipped (rank {self.rank}, slot {slot}); "
                        f"skip counts: {dict(skips.counts)}"
                    )
            if budget:
                rows = budget.plan([len(p.sample["input_ids"]) for p in buffer])
                taken = sorted({i for row in rows for i in row})
                # Row indices refer to the taken samples, in their order in the buffer.
                local = {i: k for k, i in enumerate(taken)}
                batch = self.collate(
                    [buffer[i].sample for i in taken], [[local[i] for i in row] for row in rows]
                )
            else:
                taken = list(range(self.batch_size))
                batch = self.collate([buffer[i].sample for i in taken])
            taken_set = set(taken)
            buffer = [p for i, p in enumerate(buffer) if i not in taken_set]
            state = {
                "draw": draw,
                "skips": skips.state_dict(),
                "streams": states.now,
            }
            if buffer:
                state["buffer"] = {
                    "draw": buffer[0].draw,
                    "streams": buffer[0].streams,
                    "draws": [p.draw for p in buffer],
                }
            batch[STATE_KEY] = {"slot": slot, "state": state}
            yield batch

    def _replay(self, pending, draw, slot, streams, iters, choose) -> list[_Pending]:
        """Re-draw ``pending["draw"] .. draw - 1``, keeping (and re-encoding) only the buffered draws."""
        wanted = set(pending["draws"])
        buffer = []
        quiet = SkipCounter()  # these skips were counted before the checkpoint
        states = _StreamStates(streams)
        for d in range(pending["draw"], draw):
            before = states.now
            source = self.sources[choose(d)]
            raw = next(iters[source.name])
            states.advanced(source.name)
            if d not in wanted:
                continue  # emitted or skipped before the checkpoint: read past it, no decoding
            rng = rng_for(FORMAT, self.seed, self.rank, slot, d)
            sample = self._prepare(source, raw, rng, quiet)
            if sample is None:
                log.warning(
                    "buffered sample of draw %d no longer loads (%s); resume is not exact",
                    d,
                    dict(quiet.counts),
                )
                continue
            buffer.append(_Pending(d, sample, before))
        return buffer

    def _prepare(self, source: Source, raw: dict[str, Any], rng: random.Random, skips: SkipCounter):
        return prepare_sample(self.scenarios, self.encode, source, raw, rng, skips)


def prepare_sample(
    scenarios: dict[str, Scenario],
    encode: Callable[[Any], dict[str, Any]],
    source: Source,
    raw: dict[str, Any],
    rng: random.Random,
    skips: SkipCounter,
) -> dict[str, Any] | None:
    """A raw sample loaded, formatted and encoded by its source's plugin; None (counted) if skipped."""
    scenario = scenarios[source.scenario]
    try:
        example = scenario.load(raw)
        prompt = scenario.format(example, rng)
        stored = raw.get(pretokenized.MEMBER)  # the shard's pre-tokenized form, where it has one
        sample = encode(prompt) if stored is None else encode(prompt, stored=stored)
    except SkipSample as skip:
        skips.add(source.name, skip.reason, f"{raw.get('__key__')} in {raw.get('__shard__')}: {skip.detail}")
        return None
    except Exception as err:  # noqa: BLE001 - one bad sample must not end a multi-day run
        log.exception("unexpected error on sample %s", raw.get("__key__"))
        skips.add(source.name, f"error_{type(err).__name__}", str(err))
        return None
    sample.update(
        key=prompt.key,
        scenario=prompt.scenario,
        task=prompt.task,
        question_type=prompt.question_type,
        answer=prompt.answer,
        options=_options(prompt.meta.get("options") or example.record.get("metadata", {}).get("options")),
    )
    return sample


def _options(options: Any) -> dict[str, str] | None:
    """Option texts by letter, for the choice parser's text fallback; records store a list."""
    if isinstance(options, dict):
        return {str(k): str(v) for k, v in options.items()}
    if isinstance(options, list):
        return {chr(ord("A") + i): str(text) for i, text in enumerate(options)}
    return None
