"""Gathering Python objects from every rank (a collective: every rank must call it)."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def from_all_ranks(obj: Any, group=None) -> list[Any]:
    """``obj`` of every rank of ``group`` (default: all), in rank order; ``[obj]`` in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return [obj]
    parts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, obj, group=group)
    return parts


def concatenated(items: list[Any], group=None) -> list[Any]:
    """The lists of every rank, one after the other."""
    return [item for part in from_all_ranks(items, group) for item in part]
