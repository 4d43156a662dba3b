"""From a collated batch to the core: its inputs for a training step, and decoded answers."""

from __future__ import annotations

from typing import Any

from mmscene.model.core import MultimodalLM


def core_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The core's inputs from a collated batch (host-side counts included)."""
    return {
        "input_ids": batch["input_ids"],
        "pixel_values": batch["pixel_values"],
        "attention_mask": batch.get("attention_mask"),
        "position_ids": batch.get("position_ids"),
        "image_pooling": batch.get("image_pooling"),
        "host": {
            k: batch[k]
            for k in ("image_positions", "image_pooling_flags", "image_sizes", "sample_starts")
            if batch.get(k) is not None
        },
    }


def generate_answers(
    model: MultimodalLM,
    tokenizer,
    batch: dict[str, Any],
    max_new_tokens: int,
    synced: bool = False,
    **generation: Any,
) -> list[str]:
    """Greedy (or ``generation``'s) answers to a left-padded batch, decoded and stripped: the one
    decoding path of validation, prediction and the lmms-eval model. ``synced``: sharded ranks
    step together until all are done."""
    eos = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    generation.setdefault("do_sample", False)
    new = model.generate(
        input_ids=batch["input_ids"],
        pixel_values=batch["pixel_values"],
        attention_mask=batch["attention_mask"],
        image_pooling=batch.get("image_pooling"),
        image_sizes=batch.get("image_sizes"),
        max_new_tokens=max_new_tokens,
        eos_token_id=sorted({e for e in eos if e is not None}),
        pad_token_id=tokenizer.pad_token_id,
        synced_gpus=synced,
        **generation,
    )
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
