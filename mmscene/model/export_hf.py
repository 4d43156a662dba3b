"""Export to a transformers ``LlavaForConditionalGeneration`` directory.

The weights are handed to a transformers model built on the meta device and written by its own
``save_pretrained``, so the layout on disk is whatever transformers itself reads back.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from mmscene.model.core import MultimodalLM
from mmscene.model.formats import CheckpointError

_TO_HF = [
    ("vision_tower.", "model.vision_tower."),
    ("projector.", "model.multi_modal_projector."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
]


def llava_config(model: MultimodalLM) -> LlavaConfig:
    cfg = model.config
    if cfg.projector != "mlp2x_gelu":
        raise CheckpointError(
            f"transformers Llava has only the mlp2x_gelu projector; this model uses {cfg.projector!r}"
        )
    text = cfg.text_config
    if cfg.image_token_id >= text.vocab_size:
        raise CheckpointError(
            f"image_token_id {cfg.image_token_id} lies outside the LLM vocabulary ({text.vocab_size}); transformers "
            "Llava embeds it, so resize the token embeddings (add '<image>' to the tokenizer) before exporting"
        )
    return LlavaConfig(
        vision_config=cfg.vision_config,
        text_config=text,
        image_token_index=cfg.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=cfg.vision_feature_select,
        vision_feature_layer=cfg.vision_feature_layer,
        image_seq_length=model.tokens_per_image(),
        multimodal_projector_bias=cfg.projector_bias,
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
    )


def to_hf_state(model: MultimodalLM) -> dict[str, torch.Tensor]:
    state = {}
    for key, value in model.state_dict().items():
        for src, dst in _TO_HF:
            if key.startswith(src):
                state[dst + key[len(src) :]] = value
                break
    return state


def save_llava_hf(model: MultimodalLM, out: Path, max_shard_size: str | int = "5GB") -> None:
    config = llava_config(model)
    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(config)
    missing, unexpected = hf.load_state_dict(to_hf_state(model), strict=False, assign=True)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise CheckpointError(f"export mismatch: missing {missing[:10]}, unexpected {unexpected[:10]}")
    if config.tie_word_embeddings:
        hf.tie_weights()
    hf.config.dtype = dtype
    hf.save_pretrained(str(out), max_shard_size=max_shard_size)
    if model.tokenizer is not None:
        _save_processor(model, out)


def _save_processor(model: MultimodalLM, out: Path) -> None:
    from transformers import LlavaProcessor, SiglipImageProcessor

    from mmscene.model.preprocess import image_processor_settings

    settings = image_processor_settings(model)
    image_processor = SiglipImageProcessor(**settings)
    tokenizer = model.tokenizer
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=model.config.vision_config.patch_size,
        vision_feature_select_strategy=model.config.vision_feature_select,
        num_additional_image_tokens=model.tokens_per_image() - model.patch_grid**2,
        chat_template=getattr(tokenizer, "chat_template", None),
        image_token="<image>",
    )
    processor.save_pretrained(str(out))
