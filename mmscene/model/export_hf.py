"""Export to a transformers ``LlavaForConditionalGeneration`` directory.

The weights are handed to a transformers model built on the meta device and written by its own
``save_pretrained``, so the layout on disk is whatever transformers itself reads back. The
processor written beside them preprocesses images as training did (pad to square or not, the
tower's normalisation) and expands ``<image>`` to the core's number of positions.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from mmscene.model.config import CheckpointError
from mmscene.model.core import CLS_TOWERS, MultimodalLM

log = logging.getLogger(__name__)

_TO_HF = [
    ("vision_tower.", "model.vision_tower."),
    ("projector.", "model.multi_modal_projector."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
]
# Recorded in the exported config.json when frame pooling was dropped on request.
DROPPED_POOLING_FIELD = "mmscene_dropped_frame_pool_stride"


def check_frame_pooling(model: MultimodalLM, drop_frame_pooling: bool = False) -> None:
    """Refuse to export a model that pools video frames, unless asked to drop the pooling.

    transformers' Llava has no frame pooling (LlavaNextVideo's pooler sits before the projector,
    mmscene's after it, so the two differ). Pooling touches only images marked as video frames:
    single images, multi-image sets and 3D views behave exactly as trained either way. Still, the
    exported model would give each video frame the full grid of positions it never saw in
    training, so this is refused by default; the opt-in records the stride in config.json.
    """
    stride = model.config.frame_pool_stride
    if stride == 1:
        return
    full, pooled = model.tokens_per_image(), model.tokens_per_image(pooled=True)
    if not drop_frame_pooling:
        raise CheckpointError(
            f"this model pools video frame features (model.config.frame_pool_stride={stride}: {pooled} positions "
            f"per frame instead of {full}) and transformers' LlavaForConditionalGeneration has no frame pooling. "
            "Single images, multi-image and 3D inputs would behave as trained, video frames would not. To export "
            "anyway, pass --drop-frame-pooling (save_pretrained(..., drop_frame_pooling=True)); or keep the "
            "mmscene format (mmscene export mmscene) for video."
        )
    log.warning(
        "EXPORTING WITHOUT FRAME POOLING: the model was trained with frame_pool_stride=%d (%d positions per "
        "video frame); the transformers export gives every frame %d positions, so its video answers can differ "
        "from the trained model's. Recorded as %s in config.json.",
        stride,
        pooled,
        full,
        DROPPED_POOLING_FIELD,
    )


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
    extra = {DROPPED_POOLING_FIELD: cfg.frame_pool_stride} if cfg.frame_pool_stride > 1 else {}
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
        **extra,
    )


def to_hf_state(model: MultimodalLM) -> dict[str, torch.Tensor]:
    state = {}
    for key, value in model.state_dict().items():
        for src, dst in _TO_HF:
            if key.startswith(src):
                state[dst + key[len(src) :]] = value
                break
    return state


def save_llava_hf(
    model: MultimodalLM,
    out: Path,
    max_shard_size: str | int = "5GB",
    pad_to_square: bool = True,
    drop_frame_pooling: bool = False,
) -> None:
    """``pad_to_square``: what training used (the data module's ``pad_to_square``)."""
    check_frame_pooling(model, drop_frame_pooling)
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
        build_processor(model, model.tokenizer, pad_to_square).save_pretrained(str(out))


def num_additional_image_tokens(model: MultimodalLM) -> int:
    """Tokens the tower adds to its patch grid (CLIP's CLS). LlavaProcessor expands ``<image>`` to
    ``grid² + this``, minus one under ``vision_feature_select_strategy="default"`` (CLS dropped)."""
    return int(model.config.vision_config.model_type in CLS_TOWERS)


def build_processor(model: MultimodalLM, tokenizer, pad_to_square: bool = True):
    """A ``LlavaProcessor`` that gives the pixels and ``<image>`` expansion of mmscene's data path."""
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    from mmscene.data.media.preprocess import image_processor_settings

    # The PIL backend resizes with PIL, as training does. transformers picks its torchvision
    # backend at load time when torchvision is installed, whose bicubic kernel is its own, not
    # PIL's: load with backend="pil" for training's pixels.
    image_processor = LlavaImageProcessorPil(**image_processor_settings(model, pad_to_square))
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=model.config.vision_config.patch_size,
        vision_feature_select_strategy=model.config.vision_feature_select,
        num_additional_image_tokens=num_additional_image_tokens(model),
        chat_template=getattr(tokenizer, "chat_template", None),
        image_token="<image>",
    )
    expected = model.tokens_per_image()
    got = (model.patch_grid**2) + processor.num_additional_image_tokens
    got -= int(model.config.vision_feature_select == "default")
    if got != expected:  # LlavaProcessor's own rule (replace_image_token), checked before writing
        raise CheckpointError(
            f"the processor would expand <image> to {got} tokens, the model takes {expected}"
        )
    return processor
