"""Skipped samples: the exception a loader raises and the counter every stage reports with.

Nothing is dropped without a reason that reaches the logs.
"""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger("mmscene.skips")


class SkipSample(Exception):
    """A sample that cannot be used. ``reason`` is a short stable slug that reports count by."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SkipCounter:
    """Counts per ``scenario/reason``; logs the first few details of each reason."""

    def __init__(self, log_first: int = 5):
        self.counts: Counter[str] = Counter()
        self.log_first = log_first

    def add(self, scenario: str, reason: str, detail: str = "", n: int = 1) -> None:
        """Count ``n`` samples skipped for one reason (a cut shard loses several at once)."""
        key = f"{scenario}/{reason}"
        before = self.counts[key]
        self.counts[key] += n
        if before < self.log_first:
            log.warning("skipped %s (%s): %s", "sample" if n == 1 else f"{n} samples", key, detail)
        if before <= self.log_first < self.counts[key]:
            log.warning("skipped sample (%s): further skips of this reason are only counted", key)

    def state_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.counts = Counter(state)

    @property
    def total(self) -> int:
        return sum(self.counts.values())
