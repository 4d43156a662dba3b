"""Which attention kernel the tower and the LLM use, and what packed rows need from each.

Packed rows (several samples per row, position ids restarting at 0, no attention mask) stay
block-diagonal under every implementation, but by different routes: transformers builds the
block mask from the position ids for ``eager``, ``sdpa`` and ``flex_attention`` at any batch
size, while its flash-attention path derives ``cu_seqlens`` from position ids only when the
batch has one row. :func:`needs_single_row` names the implementations for which the core
flattens a packed batch into one row first (the varlen convention), so no token attends across
samples whichever kernel runs: flash attention, and flex attention, whose document mask skips
the blocks between samples anyway (and whose CPU kernel of torch 2.13 fails to compile for a
batch of several rows).
"""

from __future__ import annotations

import importlib.util

import torch

CHOICES = ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention")


def resolve(name: str | None) -> str:
    """The implementation to build with; ``auto`` (or None) is the best this machine has."""
    name = name or "auto"
    if name not in CHOICES:
        raise ValueError(f"model.attn_implementation: {name!r} is not one of {list(CHOICES)}")
    if name == "auto":
        return "flash_attention_2" if _has_flash_attn() and torch.cuda.is_available() else "sdpa"
    if name == "flash_attention_2" and not _has_flash_attn():
        raise ValueError(
            "model.attn_implementation: flash_attention_2 needs the flash-attn package "
            "(pip install flash-attn --no-build-isolation) and a CUDA GPU; use sdpa or flex_attention here"
        )
    if name == "flex_attention" and importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        raise ValueError("model.attn_implementation: flex_attention needs torch >= 2.5")
    return name


def needs_single_row(implementation: str | None) -> bool:
    """Whether packed rows must be flattened into one row for this implementation."""
    name = str(implementation or "")
    return "flash" in name or name == "flex_attention"


def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def check_trainable(name: str, device: torch.device) -> None:
    """Refuse, before the first step, an implementation this device cannot train with: torch's
    flex attention has no CPU backward (torch 2.13 raises NotImplementedError mid-step)."""
    if name != "flex_attention" or device.type != "cpu":
        return
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.zeros(1, 1, 16, 8, requires_grad=True)
    try:
        flex_attention(q, q, q).sum().backward()
    except NotImplementedError as err:
        raise ValueError(
            f"model.attn_implementation: flex_attention cannot train on CPU with torch {torch.__version__} "
            f"({err}); use sdpa on CPU (packed rows stay exact with it) and flex_attention on a GPU"
        ) from None
