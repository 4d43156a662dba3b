"""The learning-rate schedule of training."""

from __future__ import annotations


def lr_schedule(optimizer, warmup: int, total: int | None, min_ratio: float):
    """Linear warmup from 0, then cosine decay to ``min_ratio`` of each group's LR at ``total``
    (transformers' schedules, as LLaVA's trainer uses); constant after warmup without a total."""
    from transformers.optimization import (
        get_constant_schedule_with_warmup,
        get_cosine_with_min_lr_schedule_with_warmup,
    )

    if not total or total <= warmup:
        return get_constant_schedule_with_warmup(optimizer, warmup)
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total, min_lr_rate=min_ratio)
