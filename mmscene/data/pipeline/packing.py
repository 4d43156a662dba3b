"""Multimodal sequence packing: several samples share one row up to ``max_tokens``.

Position ids restart at 0 for every sample and the attention mask is left out, which makes
transformers build a block-diagonal causal mask from the position ids (SDPA, flex attention
and flash-attention varlen all honour it), so no token attends across samples. A sample is
never split, so its images never straddle rows. The first label of each sample is masked so
that no token is trained to predict the next sample; the per-token mean over labelled tokens
is then the same as in the unpacked batch.
"""

from __future__ import annotations

from typing import Any

import torch

from mmscene.constants import IGNORE_INDEX
from mmscene.data.pipeline.collate import META_KEYS, _cat_images, image_sizes, training_counts


def first_fit(
    lengths: list[int], max_tokens: int, order: list[int] | None = None, max_rows: int | None = None
) -> list[list[int]]:
    """Indices grouped into rows, each summing to at most ``max_tokens``: each index, taken in
    ``order`` (default: as given), joins the first row with room, else opens a new row while
    fewer than ``max_rows`` exist (indices that fit nowhere are left out)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in range(len(lengths)) if order is None else order:
        n = lengths[i]
        if n > max_tokens:
            raise ValueError(
                f"sample {i} has {n} tokens, more than max_tokens={max_tokens}; raise it or max_length"
            )
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            if max_rows is None or len(rows) < max_rows:
                rows.append([i])
                room.append(max_tokens - n)
    return rows


def packed_collate(
    samples: list[dict[str, Any]], pad_id: int, rows: list[list[int]] | None = None
) -> dict[str, Any]:
    """One batch of packed rows; ``rows`` lists sample indices per row (default: all in one row).

    Images follow the order of their placeholders across rows, as the core expects.
    """
    rows = rows if rows is not None else [list(range(len(samples)))]
    width = max(sum(samples[i]["input_ids"].shape[0] for i in row) for row in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    sample_index = torch.full((n, width), -1, dtype=torch.long)  # row padding: -1
    ordered = []
    starts = []  # where each sample (and each row's padding) starts, rows laid end to end
    for r, row in enumerate(rows):
        col = 0
        for i in row:
            starts.append(r * width + col)
            s = samples[i]
            length = s["input_ids"].shape[0]
            input_ids[r, col : col + length] = s["input_ids"]
            lab = s["labels"].clone()
            lab[0] = IGNORE_INDEX
            labels[r, col : col + length] = lab
            position_ids[r, col : col + length] = torch.arange(length)
            sample_index[r, col : col + length] = len(ordered)
            col += length
            ordered.append(s)
        # Row padding is one more "sample" of its own (positions restart), fully masked.
        position_ids[r, col:] = torch.arange(width - col)
        if col < width:
            starts.append(r * width + col)
    pixel_values, image_pooling = _cat_images(ordered)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": None,
        "pixel_values": pixel_values,
        "image_pooling": image_pooling,
        "meta": [{k: s.get(k) for k in META_KEYS} for s in ordered],
        "image_sizes": image_sizes(ordered),
        "sample_index": sample_index,
        "sample_starts": starts,  # host list: the CPU varlen kernel splits rows here (no device read)
        **training_counts(ordered, image_pooling, labels),
    }
