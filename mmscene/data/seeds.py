"""Independent random streams of the data pipeline, one per purpose.

Every random choice is a pure function of ``(purpose, seed, rank, slot, index)`` so that a
resumed slot makes the same choices, and purposes never share a stream: the source chosen for
draw *d + 1* must not be predictable from how draw *d* was formatted (they once shared a seed).
Python's ``random.Random`` hashes a string seed with SHA-512, so distinct strings give
unrelated sequences.
"""

from __future__ import annotations

import random

SOURCE = "source"  # which source feeds a draw
FORMAT = "format"  # a plugin's formatting choices for a draw (placement, frame offsets, views)
SHARD_ORDER = "shard-order"  # the order of a stream's shards in an epoch
SHUFFLE = "shuffle"  # which buffered sample a stream gives next
CONVERT_ORDER = "convert-order"  # the order the converter writes records in


def rng_for(purpose: str, seed: int, *key: object) -> random.Random:
    return random.Random("/".join(str(part) for part in (purpose, seed, *key)))
