"""The training loss from the LLM's last hidden states, without full-vocabulary logits.

A 16k-token row over Qwen's 151,936-token vocabulary has 10 GB of fp32 logits, and their
gradient as much again. Here only labelled positions reach the LM head (prompt, image and padding
positions never needed logits), and their cross-entropy is summed chunk by chunk:

* ``chunked``: for each chunk of ``chunk_tokens`` positions, the forward computes the logits,
  the fp32 loss and, in the same buffer, the gradient (softmax minus one-hot), and folds it into
  the gradients of the hidden states and the head right away, as Liger-Kernel's fused kernel
  does, in plain PyTorch. So the peak holds one chunk's logits (and the head's gradient), never
  the row's; backward only scales the stored gradients. Written here because the ecosystem's
  fused kernels (Liger) are CUDA-only and the loss must be the same on a laptop.
* ``liger``: Liger-Kernel's fused linear cross-entropy (CUDA, ``pip install mmscene[gpu]``).
* ``plain``: the head over the labelled positions at once (the reference).
* ``auto``: ``liger`` on CUDA where it is installed, else ``chunked``.

All return the *sum* over labelled tokens and their count: the per-step normalisation stays in
:mod:`mmscene.train.loss`.
"""

from __future__ import annotations

import functools
import importlib.util
import types

import torch
import torch.nn.functional as F
from torch import nn

from mmscene.constants import IGNORE_INDEX

KERNELS = ("auto", "chunked", "liger", "plain")


def resolve_kernel(kernel: str, device: torch.device) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"loss kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "auto":
        return "liger" if device.type == "cuda" and _has_liger() else "chunked"
    if kernel == "liger" and not _has_liger():
        raise ValueError("loss kernel 'liger' needs liger-kernel (pip install 'mmscene[gpu]')")
    return kernel


@functools.cache
def _has_liger() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def summed_token_loss(
    hidden: torch.Tensor,
    head: nn.Linear,
    labels: torch.Tensor,
    kernel: str = "auto",
    chunk_tokens: int = 512,
    groups: torch.Tensor | None = None,
    num_groups: int = 0,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Summed next-token cross-entropy (fp32) of ``head(hidden)`` against ``labels`` (``[B, T]``,
    ``IGNORE_INDEX`` where unlabelled), and the number of labelled tokens.

    With ``groups`` (``[B, T]``, a group id in ``[0, num_groups)`` per position, e.g. the
    sample's scenario), also ``[num_groups, 2]``: each group's detached loss sum and token count
    (None under ``liger``, whose kernel gives no per-token losses).

    ``positions`` (1-D, flat positions of ``[B * T]`` whose next token is labelled, as the collate
    computes them on the host) replaces the boolean gather, which would make the host wait for
    the device to count the labelled tokens."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if positions is None:
        keep = labels[:, 1:] != IGNORE_INDEX
        positions = (keep.nonzero() * torch.tensor([labels.shape[1], 1], device=keep.device)).sum(1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
    y = labels.reshape(-1).index_select(0, positions + 1)
    # the host's positions must agree with the labels the core masked (asynchronous on a GPU)
    torch._assert_async((y != IGNORE_INDEX).all(), "loss positions point at unlabelled tokens")
    count = torch.full((), positions.numel(), dtype=torch.float32, device=hidden.device)
    kernel = resolve_kernel(kernel, hidden.device)
    if h.shape[0] == 0 and kernel == "liger":
        # nothing labelled: the chunked kernel's zero still reaches the head (zero gradients)
        kernel = "chunked"
    # A head sharded as its own FSDP2 unit holds only its shard outside its forward methods:
    # call it through the method sharding registered (mmscene.train.sharding), which gathers it.
    method = getattr(head, HEAD_LOSS_METHOD, None)
    loss, per_token = (
        method(h, y, kernel, chunk_tokens)
        if method is not None
        else head_loss(head, h, y, kernel, chunk_tokens)
    )
    if groups is None:
        return loss, count
    if per_token is None:
        return loss, count, None
    by_group = torch.zeros(num_groups, 2, dtype=torch.float32, device=hidden.device)
    which = groups.reshape(-1).index_select(0, positions + 1)
    by_group[:, 0].index_add_(0, which, per_token.detach().float())
    by_group[:, 1].index_add_(0, which, torch.ones_like(per_token, dtype=torch.float32))
    return loss, count.float(), by_group


HEAD_LOSS_METHOD = "mmscene_head_loss"


def head_loss(
    head: nn.Linear, h: torch.Tensor, y: torch.Tensor, kernel: str, chunk_tokens: int
) -> torch.Tensor:
    """Summed cross-entropy of ``head(h)`` against ``y`` (``kernel`` already resolved), and the
    per-token losses (detached; None under ``liger``)."""
    if kernel == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, h, y, head.bias)
        return loss.float(), None
    if kernel == "plain":
        per_token = _token_losses(h, y, head.weight, head.bias)
        return per_token.sum(), per_token.detach()
    return _FusedLinearCrossEntropy.apply(h, head.weight, head.bias, y, chunk_tokens)


def attach_head_loss(head: nn.Linear) -> str:
    """Give ``head`` the :func:`head_loss` method (for FSDP2's ``register_fsdp_forward_method``)."""
    setattr(head, HEAD_LOSS_METHOD, types.MethodType(head_loss, head))
    return HEAD_LOSS_METHOD


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``h @ weight.T + bias`` against ``y``, gradients made in forward."""

    @staticmethod
    def forward(ctx, h, weight, bias, y, chunk_tokens):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        per_token = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_tokens):
            hc, yc = h[start : start + chunk_tokens], y[start : start + chunk_tokens]
            logits = F.linear(hc, weight, bias).float()
            target = logits.gather(1, yc[:, None]).squeeze(1)
            # log-sum-exp and softmax in the logits' own buffer (torch.logsumexp would make a
            # second chunk-sized tensor)
            top = logits.amax(dim=-1, keepdim=True)
            norm = logits.sub_(top).exp_().sum(dim=-1, keepdim=True)
            per_token[start : start + chunk_tokens] = (norm.log() + top).squeeze(1).sub(target)
            if not (need_h or need_w or need_b):
                continue
            grad = logits.div_(norm)  # softmax
            grad[torch.arange(yc.shape[0], device=yc.device), yc] -= 1.0
            if need_w:  # in place, fp32: no second head-sized tensor per chunk
                grad_w.addmm_(grad.T, hc.float())
            if need_b:
                grad_b += grad.sum(0)
            if need_h:  # in the model's dtype, as autograd would pass it back through .float()
                grad_h[start : start + chunk_tokens] = grad.to(weight.dtype) @ weight
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(per_token)
        return per_token.sum(), per_token

    @staticmethod
    def backward(ctx, grad_out, _grad_per_token):
        # scaled in place: the stored gradients serve this one backward (no retain_graph)
        saved = iter(ctx.saved_tensors)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = next(saved).mul_(grad_out.to(ctx.saved_tensors[0].dtype)) if need_h else None
        grad_w = next(saved).mul_(grad_out).to(ctx.dtypes[0]) if need_w else None
        grad_b = next(saved).mul_(grad_out).to(ctx.dtypes[1]) if need_b else None
        return grad_h, grad_w, grad_b, None, None


def _token_losses(
    h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    logits = F.linear(h, weight, bias).float()
    return F.cross_entropy(logits, y, reduction="none")
