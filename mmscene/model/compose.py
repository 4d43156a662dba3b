"""Stage composition: a pretrained vision tower and a pretrained LLM joined by a fresh projector."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from mmscene.model.config import DEFAULT_IMAGE_TOKEN_ID, MultimodalConfig, hf_config_dict
from mmscene.model.formats import build_empty


def compose(
    vision: str | Path,
    llm: str | Path,
    projector: str = "mlp2x_gelu",
    drop_vision_layers: int = 1,
    vision_feature_layer: int = -1,
    vision_feature_select: str = "full",
    image_token_id: int | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    **config_kwargs: Any,
) -> Any:
    """``drop_vision_layers=1`` is the interleave recipe: SigLIP's last layer is removed.

    Only the two pretrained parts and the projector are ever allocated: the frame around them
    is built on the meta device.
    """
    from mmscene.model import attention

    attn = {"attn_implementation": attention.resolve(attn_implementation)}
    vision_cfg = AutoConfig.from_pretrained(str(vision), trust_remote_code=False)
    vision_cfg = getattr(vision_cfg, "vision_config", vision_cfg)  # a full SigLIP/CLIP checkpoint
    tower = AutoModel.from_pretrained(
        str(vision), config=vision_cfg, dtype=dtype, trust_remote_code=False, **attn
    )
    if drop_vision_layers:
        layers = tower.encoder.layers
        if drop_vision_layers >= len(layers):
            raise ValueError(f"cannot drop {drop_vision_layers} of {len(layers)} vision layers")
        del layers[len(layers) - drop_vision_layers :]
        tower.config.num_hidden_layers = len(layers)
    lm = AutoModelForCausalLM.from_pretrained(str(llm), dtype=dtype, trust_remote_code=False, **attn)
    tokenizer = None
    with contextlib.suppress(OSError, ValueError):  # weights without a tokenizer: the data side brings one
        tokenizer = AutoTokenizer.from_pretrained(str(llm), trust_remote_code=False)
    if image_token_id is None:
        image_token_id = _image_token_id(tokenizer)
    config = MultimodalConfig(
        vision=hf_config_dict(tower.config),
        text=hf_config_dict(lm.config),
        projector=projector,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select=vision_feature_select,
        image_token_id=image_token_id,
        **config_kwargs,
    )
    with torch.device("meta"):
        model = build_empty(config, dtype, attn_implementation)
    model.vision_tower = tower
    model.language_model = lm
    model.projector.to_empty(device=next(lm.parameters()).device)
    model.projector.apply(_init_linear)  # the projector is the only freshly built part
    model.tokenizer = tokenizer
    return model


def _image_token_id(tokenizer) -> int:
    if tokenizer is None:
        return DEFAULT_IMAGE_TOKEN_ID
    ids = tokenizer.convert_tokens_to_ids(["<image>"])
    unk = tokenizer.unk_token_id
    if ids and ids[0] is not None and ids[0] != unk:
        return int(ids[0])
    return DEFAULT_IMAGE_TOKEN_ID


def _init_linear(module: torch.nn.Module) -> None:
    if isinstance(module, torch.nn.Linear):
        torch.nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            torch.nn.init.zeros_(module.bias)
