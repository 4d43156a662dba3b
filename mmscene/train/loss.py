"""The training loss in plain view: summed token cross-entropy, normalised per optimizer step.

A micro-batch contributes the *sum* of its token losses (computed without full logits by
:mod:`mmscene.model.token_loss`); :meth:`MMSceneModule.backward` divides
the step's accumulated gradients by the step's labelled-token count on all ranks
(:func:`scale_gradients`), so every labelled token of an optimizer step weighs the same.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from mmscene.constants import IGNORE_INDEX


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy (fp32) over labelled positions, and their count, from full
    logits: the unfused reference that training's chunked loss (:mod:`mmscene.model.token_loss`)
    is tested and benchmarked against."""
    targets = labels[:, 1:].reshape(-1)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    loss = torch.nn.functional.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (targets != IGNORE_INDEX).sum().to(loss.dtype)


def scale_gradients(parameters: Iterable[torch.nn.Parameter], scale: torch.Tensor) -> None:
    """Multiply every gradient in place (the local shard of a sharded one) by ``scale``."""
    for p in parameters:
        if p.grad is not None:
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            grad.mul_(scale.to(grad.dtype))
