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

``sdpa_varlen`` is the CPU's varlen kernel (the default there): packed rows, flattened into one
row, run SDPA once per sample, so attention costs the sum of each sample's length squared
rather than the row's; everything else (padded batches, generation, the tower) is plain SDPA.
Neither flash-attention (CUDA only) nor flex attention (no CPU backward in torch 2.13) trains
packed rows on a CPU without the dense row-by-row mask. It reads the samples' starts from the
packed collate's host list (or, called without one, from the position ids: a device read, so
on a GPU ``flash_attention_2`` or ``flex_attention`` is the varlen kernel and ``auto`` never picks
this one there). Given the host's list, transformers builds no ``[L, L]`` mask for the row
(:func:`host_starts`). Its Python loop over samples would recompile a compiled block for every
packing, so ``model.compile`` takes SDPA instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util

import torch

CHOICES = ("auto", "sdpa", "sdpa_varlen", "eager", "flash_attention_2", "flex_attention")
SDPA_VARLEN = "mmscene_sdpa_varlen"  # its name in transformers' attention registry


def resolve(name: str | None, compiled: bool = False) -> str:
    """The implementation to build with; ``auto`` (or None) is the best this machine has
    (``compiled``: for blocks run through ``torch.compile``)."""
    name = name or "auto"
    if name == SDPA_VARLEN:  # already resolved
        name = "sdpa_varlen"
    if name not in CHOICES:
        raise ValueError(f"model.attn_implementation: {name!r} is not one of {list(CHOICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return "flash_attention_2" if _has_flash_attn() else "sdpa"
        name = "sdpa" if compiled else "sdpa_varlen"
    if name == "sdpa_varlen" and compiled:
        raise ValueError(
            "model.attn_implementation: sdpa_varlen loops over the samples of a packed row, so with "
            "model.compile every new packing would recompile; use sdpa (or auto) with compile"
        )
    if name == "sdpa_varlen":
        register_sdpa_varlen()
        return SDPA_VARLEN
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
    return "flash" in name or name in ("flex_attention", SDPA_VARLEN)


@functools.cache
def register_sdpa_varlen() -> None:
    """Make ``sdpa_varlen`` known to transformers (its masks are SDPA's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    def mask(*args, **kwargs):
        # the host's starts say how the row splits: the kernel ignores a mask there, so none is
        # built (transformers passes these by keyword)
        q_length = kwargs.get("q_length", getattr(kwargs.get("cache_position"), "shape", [None])[0])
        one_row = kwargs.get("batch_size") == 1 and q_length == kwargs.get("kv_length") and not args
        unmasked = kwargs.get("attention_mask") is None and kwargs.get("local_size") is None
        if _HOST_STARTS.get() and one_row and unmasked:
            return None
        return sdpa_mask(*args, **kwargs)

    AttentionInterface.register(SDPA_VARLEN, sdpa_varlen_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SDPA_VARLEN, mask)


_HOST_STARTS: contextvars.ContextVar[bool] = contextvars.ContextVar("mmscene_host_starts", default=False)


@contextlib.contextmanager
def host_starts(given: bool):
    """While active (``given``), packed rows are split at the ``sample_starts`` the forward
    passes on, and the LLM builds no ``[L, L]`` mask for them."""
    token = _HOST_STARTS.set(given)
    try:
        yield
    finally:
        _HOST_STARTS.reset(token)


_starts: tuple[torch.Tensor, list[int]] | None = None  # the last position ids and their sample starts


def _sample_starts(position_ids: torch.Tensor) -> list[int]:
    """Where each sample of a flattened packed row starts; read once per forward (every layer
    gets the same position ids tensor)."""
    global _starts
    if _starts is None or _starts[0] is not position_ids:
        row = position_ids[0]
        starts = (row == 0).nonzero().flatten().tolist()
        _starts = (position_ids, starts if starts and starts[0] == 0 else [0, *starts])
    return _starts[1]


def sdpa_varlen_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention signature: ``query`` ``[1, heads, L, dim]``, out ``[1, L, heads, dim]``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    packed = (
        getattr(module, "is_causal", False)
        and position_ids is not None
        and position_ids.shape[0] == 1
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2] == position_ids.shape[1]  # no cache: training's forward
    )
    starts = (kwargs.get("sample_starts") or _sample_starts(position_ids)) if packed else []
    if len(starts) < 2:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    lengths = [b - a for a, b in zip(starts, [*starts[1:], query.shape[2]])]
    gqa = query.shape[1] != key.shape[1]
    # split, not slices: one backward that concatenates, where each slice's backward would write
    # its gradient into a zero-filled copy of the whole row
    parts = [
        torch.nn.functional.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=dropout if module.training else 0.0,
            is_causal=True,
            scale=scaling,
            enable_gqa=gqa,
        )
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


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
