"""Batching encoded samples: right-padded rows (training) or left-padded prompts (generation)."""

from __future__ import annotations

from typing import Any

import torch

from mmscene.constants import IGNORE_INDEX

META_KEYS = ("key", "scenario", "task", "question_type", "answer", "options")


def image_sizes(samples: list[dict[str, Any]]) -> list | None:
    """Per image of the batch, in order: its ``(height, width)`` when it comes as AnyRes crops,
    else None; None when no image does."""
    sizes = [size for s in samples for size in s.get("image_sizes") or [None] * len(s["image_pooling"])]
    return sizes if any(sizes) else None


def _cat_images(samples: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = [s["pixel_values"] for s in samples if s["pixel_values"].shape[0]]
    pooling = [s["image_pooling"] for s in samples if s["pixel_values"].shape[0]]
    if not pixels:
        size = samples[0]["pixel_values"].shape[-1]
        return torch.zeros(0, 3, size, size), torch.zeros(0, dtype=torch.bool)
    return torch.cat(pixels), torch.cat(pooling)


def pad_collate(samples: list[dict[str, Any]], pad_id: int, left: bool = False) -> dict[str, Any]:
    longest = max(s["input_ids"].shape[0] for s in samples)
    n = len(samples)
    input_ids = torch.full((n, longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, longest), dtype=torch.long)
    has_labels = "labels" in samples[0]
    labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long) if has_labels else None
    sample_index = torch.full((n, longest), -1, dtype=torch.long)
    for i, s in enumerate(samples):
        length = s["input_ids"].shape[0]
        cols = slice(longest - length, longest) if left else slice(0, length)
        input_ids[i, cols] = s["input_ids"]
        attention_mask[i, cols] = 1
        sample_index[i, cols] = i
        if has_labels:
            labels[i, cols] = s["labels"]
    pixel_values, image_pooling = _cat_images(samples)
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "image_pooling": image_pooling,
        "meta": [{k: s.get(k) for k in META_KEYS} for s in samples],
        "image_sizes": image_sizes(samples),
    }
    if has_labels:
        batch["labels"] = labels
        batch["sample_index"] = sample_index
        batch.update(training_counts(samples, image_pooling, labels))
    return batch


def training_counts(
    samples: list[dict[str, Any]], image_pooling: torch.Tensor, labels: torch.Tensor
) -> dict[str, Any]:
    """What the training step and the telemetry would otherwise read back from the device,
    computed on the host at collate time, so the loop has no device syncs of its own:

    * ``label_positions``: flat positions (of ``[rows * width]``) whose next token is labelled,
      the positions the loss reads (a row's last position never: it predicts no token of its row);
    * ``image_positions``: the ``<image>`` positions of the batch (when the encoder counted them);
    * ``image_pooling_flags``: which images are pooled video frames, as a list;
    * ``real_tokens``, ``sample_lengths``, ``pooled_images``, ``pretokenized``: the telemetry's
      counts (``pretokenized``: samples whose ids came from the shard's stored form).
    """
    lengths = [s["input_ids"].shape[0] for s in samples]
    nxt = torch.full_like(labels, IGNORE_INDEX)
    nxt[:, :-1] = labels[:, 1:]
    counted = all("image_positions" in s for s in samples)
    return {
        "label_positions": (nxt.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1),
        "image_positions": sum(s["image_positions"] for s in samples) if counted else None,
        "image_pooling_flags": image_pooling.tolist(),
        "real_tokens": sum(lengths),
        "sample_lengths": lengths,
        "pooled_images": int(image_pooling.sum()),
        "pretokenized": sum(bool(s.get("pretokenized")) for s in samples),
    }
