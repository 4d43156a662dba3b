"""Token-budget batching: batches sized by tokens, chosen from a bounded lookahead buffer.

The mixer keeps up to ``lookahead`` encoded samples in draw order and asks :meth:`TokenBudget.plan`
which of them form the next batch. The plan always takes the oldest buffered sample, so no sample
waits more than ``lookahead`` batches (which also bounds what a resume has to re-read), and fills
the rest of the budget so that padding is minimal:

- ``pack: true``: first-fit-decreasing into rows of ``row_tokens`` (several samples per row,
  positions restart, see :mod:`mmscene.data.pipeline.packing`); the batch holds ``max_tokens // row_tokens``
  rows. A sample is never split, so its images always stay in its row.
- ``pack: false``: one sample per row, rows padded to the batch's longest; samples of similar
  length are grouped so that ``rows x longest <= max_tokens``.

The buffer holds decoded pixels: budget about ``lookahead x images per sample x 1.7 MB`` (384 px
fp32) per DataLoader worker, e.g. ~0.5 GB for 64 samples of an M4-like mix.

YAML (``data.batching``)::

    batching:
      mode: tokens        # samples (default): batch_size samples padded to the longest
      max_tokens: 4096    # tokens per batch and rank, padding included
      lookahead: 64       # encoded samples buffered to choose each batch from
      pack: true          # several samples per row (restarting positions)
      row_tokens: null    # row length when packing (default: max_tokens, one row per batch)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from mmscene.data.pipeline.collate import pad_collate
from mmscene.data.pipeline.packing import first_fit, packed_collate

BATCHING_KEYS = ("mode", "max_tokens", "lookahead", "pack", "row_tokens")


@dataclasses.dataclass(frozen=True)
class TokenBudget:
    max_tokens: int
    lookahead: int = 64
    pack: bool = True
    row_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"batching.max_tokens must be >= 1, got {self.max_tokens}")
        if self.lookahead < 1:
            raise ValueError(f"batching.lookahead must be >= 1, got {self.lookahead}")
        if self.row_tokens is not None:
            if not self.pack:
                raise ValueError("batching.row_tokens only applies with pack: true")
            if not 1 <= self.row_tokens <= self.max_tokens:
                raise ValueError(
                    f"batching.row_tokens must be in [1, max_tokens={self.max_tokens}], got {self.row_tokens}"
                )

    @property
    def row_capacity(self) -> int:
        """The longest sample a batch can take."""
        return (self.row_tokens or self.max_tokens) if self.pack else self.max_tokens

    @property
    def rows(self) -> int:
        return self.max_tokens // self.row_capacity if self.pack else 0

    def plan(self, lengths: list[int]) -> list[list[int]]:
        """Rows of indices into ``lengths`` (buffer order, oldest first) forming the next batch.

        Index 0 is always taken. Indices not returned stay buffered for later batches.
        """
        if not lengths:
            raise ValueError("nothing to batch")
        too_long = [i for i, n in enumerate(lengths) if n > self.row_capacity]
        if too_long:
            raise ValueError(f"samples {too_long} are longer than the row capacity {self.row_capacity}")
        return self._pack(lengths) if self.pack else self._group(lengths)

    def _pack(self, lengths: list[int]) -> list[list[int]]:
        # The oldest sample first (it must go), then longest first (ties: oldest first) so that
        # large samples find room while rows are empty.
        order = [0, *sorted(range(1, len(lengths)), key=lambda i: (-lengths[i], i))]
        return first_fit(lengths, self.row_capacity, order=order, max_rows=self.rows)

    def _group(self, lengths: list[int]) -> list[list[int]]:
        # For each candidate longest L, the best batch takes the oldest sample plus the longest
        # others that are <= L (least padding), up to max_tokens // L rows. Score: real tokens minus
        # padding, so a sample joins only when it brings more tokens than padding (> L / 2); shorter
        # ones wait in the buffer for partners of their size. Ties: the batch that computes less.
        others = sorted(range(1, len(lengths)), key=lambda i: (-lengths[i], i))
        best: tuple[tuple[int, int], list[int]] | None = None
        for longest in sorted({n for n in lengths if n >= lengths[0]}):
            n_rows = self.max_tokens // longest
            chosen = [0] + [i for i in others if lengths[i] <= longest][: n_rows - 1]
            real = sum(lengths[i] for i in chosen)
            computed = len(chosen) * max(lengths[i] for i in chosen)
            score = (2 * real - computed, -computed)
            if best is None or score > best[0]:
                best = (score, chosen)
        return [[i] for i in sorted(best[1])]


def parse_batching(spec: dict[str, Any] | None) -> TokenBudget | None:
    """``data.batching`` → a :class:`TokenBudget`, or None for sample-count batches."""
    if not spec:
        return None
    if not isinstance(spec, dict):
        raise ValueError(f"data.batching must be a mapping with keys {BATCHING_KEYS}, got {spec!r}")
    unknown = sorted(set(spec) - set(BATCHING_KEYS))
    if unknown:
        raise ValueError(f"data.batching: unknown keys {unknown} (allowed: {', '.join(BATCHING_KEYS)})")
    mode = spec.get("mode", "samples")
    if mode == "samples":
        extra = sorted(k for k in spec if k != "mode")
        if extra:
            raise ValueError(f"data.batching: {extra} only apply with mode: tokens")
        return None
    if mode != "tokens":
        raise ValueError(f"data.batching.mode must be 'samples' or 'tokens', got {mode!r}")
    if spec.get("max_tokens") is None:
        raise ValueError("data.batching: mode: tokens needs max_tokens")
    return TokenBudget(
        max_tokens=int(spec["max_tokens"]),
        lookahead=int(spec.get("lookahead", 64)),
        pack=bool(spec.get("pack", True)),
        row_tokens=None if spec.get("row_tokens") is None else int(spec["row_tokens"]),
    )


def collate_rows(
    samples: list[dict[str, Any]], rows: list[list[int]], pad_id: int, pack: bool
) -> dict[str, Any]:
    """One batch from a plan: packed rows, or one right-padded sample per row."""
    if pack:
        return packed_collate(samples, pad_id, rows=rows)
    return pad_collate([samples[i] for row in rows for i in row], pad_id)


def row_collate(pad_id: int, pack: bool) -> Callable[[list[dict[str, Any]], list[list[int]]], dict[str, Any]]:
    """A picklable ``collate(samples, rows)`` for :class:`~mmscene.data.pipeline.mixer.MixedBatches` (workers)."""
    from functools import partial

    return partial(collate_rows, pad_id=pad_id, pack=pack)


def plan_batches(budget: TokenBudget, lengths: list[int]) -> list[list[list[int]]]:
    """The batches the mixer forms from samples arriving with ``lengths``, as rows of indices.

    Offline twin of the buffer loop in :class:`~mmscene.data.pipeline.mixer.MixedBatches` (fill to
    ``lookahead``, plan, remove), for benchmarks and for sizing a budget on known lengths.
    """
    batches: list[list[list[int]]] = []
    buffer: list[int] = []
    arriving = iter(range(len(lengths)))
    while True:
        for i in arriving:
            buffer.append(i)
            if len(buffer) >= budget.lookahead:
                break
        if not buffer:
            return batches
        rows = budget.plan([lengths[i] for i in buffer])
        batches.append([[buffer[k] for k in row] for row in rows])
        taken = {k for row in rows for k in row}
        buffer = [i for k, i in enumerate(buffer) if k not in taken]
