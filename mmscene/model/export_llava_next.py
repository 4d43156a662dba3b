"""Export of an AnyRes model (``patch_merge: spatial_unpad`` with grid pinpoints) to transformers'
``LlavaNextForConditionalGeneration``, with a ``LlavaNextProcessor`` that cuts images as training
did (:func:`mmscene.data.media.anyres.crop_images`).

transformers' LlavaNext treats every image as AnyRes (it derives crops from the image size), so
images that training gave as one crop (multi-image sets, frames) get AnyRes crops there; models
without pinpoints have no LlavaNext form and are refused.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

from mmscene.model.config import CheckpointError
from mmscene.model.core import MultimodalLM
from mmscene.model.export_hf import llava_config, to_hf_state


def llava_next_config(model: MultimodalLM) -> LlavaNextConfig:
    cfg = model.config
    if not cfg.image_grid_pinpoints:
        raise CheckpointError(
            "this model ends images with image_newline (patch_merge: spatial_unpad) but has no AnyRes "
            "pinpoints: neither transformers' Llava nor LlavaNext computes its positions"
        )
    if cfg.frame_pool_stride > 1:
        raise CheckpointError("transformers' LlavaNext has no frame pooling; export a model without it")
    if cfg.anyres_rounding != "transformers":
        raise CheckpointError("LlavaNext unpads with transformers' rounding; this model uses LLaVA-NeXT's")
    base = llava_config(model).to_dict()
    keep = (
        "image_token_index",
        "projector_hidden_act",
        "vision_feature_select_strategy",
        "vision_feature_layer",
        "multimodal_projector_bias",
        "tie_word_embeddings",
    )
    return LlavaNextConfig(
        vision_config=cfg.vision_config,
        text_config=cfg.text_config,
        image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints],
        image_seq_length=model.patch_grid**2,
        **{k: base[k] for k in keep},
    )


def save_llava_next(
    model: MultimodalLM, out: Path, max_shard_size: str | int = "5GB", pad_to_square: bool = True, **_: object
) -> None:
    config = llava_next_config(model)
    state = to_hf_state(model)
    state["model.image_newline"] = state.pop("model.multi_modal_projector.image_newline")
    with torch.device("meta"):
        hf = LlavaNextForConditionalGeneration(config)
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise CheckpointError(f"export mismatch: missing {missing[:10]}, unexpected {unexpected[:10]}")
    if config.tie_word_embeddings:
        hf.tie_weights()
    hf.config.dtype = next(model.parameters()).dtype
    hf.save_pretrained(str(out), max_shard_size=max_shard_size)
    if model.tokenizer is not None:
        build_processor(model, model.tokenizer).save_pretrained(str(out))
    print(f"AnyRes model: exported as transformers' LlavaNextForConditionalGeneration to {out}")


def build_processor(model: MultimodalLM, tokenizer):
    """A ``LlavaNextProcessor`` cutting images as :func:`mmscene.data.media.anyres.crop_images`."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    from mmscene.data.media.preprocess import normalisation

    size = {"height": model.image_size, "width": model.image_size}
    norm = normalisation(model.config.vision_config.model_type)
    image_processor = LlavaNextImageProcessorPil(
        size=size,
        crop_size=size,
        image_grid_pinpoints=[list(p) for p in model.config.image_grid_pinpoints],
        image_mean=list(norm["image_mean"]),
        image_std=list(norm["image_std"]),
        do_center_crop=False,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=int(model.config.vision_config.patch_size),
        vision_feature_select_strategy=model.config.vision_feature_select,
        image_token="<image>",
    )
