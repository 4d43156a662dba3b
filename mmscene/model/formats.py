"""Checkpoint formats: detection, loading and saving.

- ``mmscene``: ``config.json`` (``{"format": "mmscene", ...}``) + safetensors in mmscene's own keys.
- ``llava-hf``: transformers ``LlavaForConditionalGeneration`` (both the legacy key layout found on
  the hub and the layout transformers 5 keeps in memory).
- ``llava_qwen``: the original LLaVA-NeXT ``LlavaQwenForCausalLM`` layout (``model.mm_projector.*``,
  ``model.vision_tower.vision_tower.vision_model.*``, ``model.layers.*``, ``lm_head``).

Key mapping is written out here rather than left to ``from_pretrained`` so that a missing
weight is an error naming the key, never a silently random-initialised tensor.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from mmscene.model.config import (
    DEFAULT_IMAGE_TOKEN_ID,
    CheckpointError,
    MultimodalConfig,
    hf_config_dict,
    load_preset,
)
from mmscene.model.core import MultimodalLM
from mmscene.model.weights import LazyWeights, write_weights

log = logging.getLogger(__name__)

# Weights that exist in checkpoints but never influence the features the core uses.
_UNUSED = re.compile(r"^vision_tower\.(post_layernorm|head)\.")
_SIGLIP_PRESETS = {"google/siglip-so400m-patch14-384": "siglip-so400m-patch14-384-26l"}


# ---------------------------------------------------------------------- detection
def detect_format(config: dict[str, Any]) -> str:
    if config.get("format") == "mmscene":
        return "mmscene"
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type in ("llava", "llava_next") or {
        "LlavaForConditionalGeneration",
        "LlavaNextForConditionalGeneration",
    } & set(archs):
        return "llava-hf"
    if model_type == "llava_qwen" or "LlavaQwenForCausalLM" in archs:
        return "llava_qwen"
    raise CheckpointError(
        f"unknown checkpoint layout: model_type={model_type!r}, architectures={archs}; mmscene reads "
        "mmscene checkpoints, transformers Llava ('llava') and original LLaVA-NeXT ('llava_qwen') checkpoints"
    )


def _resolve_dir(path: str | Path) -> Path:
    local = Path(path)
    if local.is_dir():
        return local
    if local.exists() or str(path).startswith((".", "/")) or str(path).count("/") != 1:
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    from huggingface_hub import snapshot_download  # a hub id such as llava-hf/llava-interleave-qwen-0.5b-hf

    return Path(
        snapshot_download(
            str(path), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
        )
    )


def read_config(path: str | Path, **overrides: Any) -> MultimodalConfig:
    """The model config of a checkpoint directory of any known format, without its weights."""
    folder = _resolve_dir(path)
    raw, fmt = _raw_config(folder)
    state = None
    if fmt == "llava_qwen":
        from safetensors import safe_open

        from mmscene.model.weights import weight_files

        state = {}
        for file in weight_files(folder):
            with safe_open(str(file), "pt") as f:
                state.update(dict.fromkeys(f.keys()))
    return _config(fmt, raw, state, folder, dict(overrides))


def _raw_config(folder: Path) -> tuple[dict[str, Any], str]:
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"no config.json in {folder}")
    raw = json.loads(cfg_file.read_text())
    return raw, detect_format(raw)


def _config(
    fmt: str, raw: dict[str, Any], state, folder: Path, overrides: dict[str, Any]
) -> MultimodalConfig:
    if fmt == "mmscene":
        return MultimodalConfig.from_dict({**raw, **overrides})
    if fmt == "llava-hf":
        return _config_from_llava_hf(raw, overrides)
    return _config_from_llava_qwen(raw, state, folder, overrides)


def load_pretrained(
    path: str | Path,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    **overrides: Any,
) -> MultimodalLM:
    folder = _resolve_dir(path)
    raw, fmt = _raw_config(folder)
    weights = LazyWeights(folder)
    config = _config(fmt, raw, weights.shapes, folder, overrides)
    names = {k: k for k in weights.shapes}  # model key -> checkpoint key
    if fmt == "llava-hf":
        names = _remap(names, _llava_hf_key)
    elif fmt == "llava_qwen":
        names = _remap(names, _llava_qwen_key)
    model = build_empty(config, dtype, attn_implementation)
    _load_state(model, names, weights, source=f"{fmt} checkpoint {folder}")
    model.tokenizer = _maybe_tokenizer(folder)
    return model


def build_empty(
    config: MultimodalConfig, dtype: torch.dtype | None = None, attn_implementation: str | None = None
) -> MultimodalLM:
    """A model whose weights are about to be loaded: skip the (slow) random init."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers 5.x
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = MultimodalLM(config, attn_implementation)
    return model.to(dtype) if dtype is not None else model


def _maybe_tokenizer(folder: Path):
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)


# ---------------------------------------------------------------------- key mapping
def _remap(state: dict[str, torch.Tensor], rule: Callable[[str], str | None]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        new = rule(key)
        if new is None:
            log.info("ignoring checkpoint tensor %s (not used by the mmscene core)", key)
            continue
        out[new] = value
    return out


_LLAVA_HF_RULES = [
    (re.compile(r"^(model\.)?vision_tower\.(vision_model\.)?"), "vision_tower."),
    (re.compile(r"^(model\.)?multi_modal_projector\."), "projector."),
    (re.compile(r"^(model\.)?image_newline$"), "projector.image_newline"),  # LlavaNext (AnyRes)
    (re.compile(r"^language_model\.model\."), "language_model.model."),
    (re.compile(r"^language_model\.lm_head\."), "language_model.lm_head."),
    (re.compile(r"^model\.language_model\."), "language_model.model."),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
]

_LLAVA_QWEN_RULES = [
    (re.compile(r"^model\.vision_tower\.vision_tower\.(vision_model\.)?"), "vision_tower."),
    (re.compile(r"^model\.mm_projector\.0\."), "projector.linear_1."),
    (re.compile(r"^model\.mm_projector\.2\."), "projector.linear_2."),
    (re.compile(r"^model\.mm_projector\.(?=weight|bias)"), "projector.linear_1."),
    (re.compile(r"^model\.image_newline$"), "projector.image_newline"),  # spatial_unpad's row end
    (re.compile(r"^model\."), "language_model.model."),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
]


def _apply_rules(rules, key: str) -> str | None:
    for pattern, repl in rules:
        if pattern.search(key):
            return None if repl is None else pattern.sub(repl, key, count=1)
    raise CheckpointError(f"unexpected tensor {key!r}: not part of a known checkpoint layout")


def _llava_hf_key(key: str) -> str | None:
    return _apply_rules(_LLAVA_HF_RULES, key)


def _llava_qwen_key(key: str) -> str | None:
    return _apply_rules(_LLAVA_QWEN_RULES, key)


def _load_state(model: MultimodalLM, names: dict[str, str], weights: LazyWeights, source: str) -> None:
    """Copy each checkpoint tensor into its parameter, one at a time, after checking that names
    and shapes match exactly (a missing weight is an error, never a random tensor)."""
    expected = model.state_dict()
    tied = bool(getattr(model.config.text_config, "tie_word_embeddings", False))
    flat_newline = "projector.image_newline" not in expected  # a flat model never reads it
    unexpected = sorted(
        k
        for k in names
        if k not in expected
        and not _UNUSED.match(k)
        and not (flat_newline and k == "projector.image_newline")
    )
    if unexpected:
        raise CheckpointError(f"{source} holds tensors the model does not have: {unexpected[:20]}")
    missing = sorted(
        k
        for k in expected
        if k not in names and not _UNUSED.match(k) and not (tied and k == "language_model.lm_head.weight")
    )
    if missing:
        raise CheckpointError(
            f"{source} is missing weights: {missing[:20]}" + (" ..." if len(missing) > 20 else "")
        )
    for key, stored in names.items():
        shape = weights.shapes[stored]
        if key in expected and shape != tuple(expected[key].shape):
            raise CheckpointError(
                f"{source}: tensor {key} has shape {shape}, the model expects {tuple(expected[key].shape)}"
            )
    with torch.no_grad():
        for key, tensor in weights.read({k: v for k, v in names.items() if k in expected}):
            expected[key].copy_(tensor)
    if tied:
        model.language_model.tie_weights()


# ---------------------------------------------------------------------- configs of foreign formats
def _config_from_llava_hf(raw: dict[str, Any], overrides: dict[str, Any]) -> MultimodalConfig:
    hf = AutoConfig.for_model(**raw)
    vision = hf.vision_config
    layer = hf.vision_feature_layer
    if not isinstance(layer, int):
        raise CheckpointError(f"multi-layer vision features ({layer}) are not supported")
    values = dict(
        vision=hf_config_dict(vision),
        text=hf_config_dict(hf.text_config),
        projector="mlp2x_gelu",
        projector_bias=bool(getattr(hf, "multimodal_projector_bias", True)),
        vision_feature_layer=layer,
        vision_feature_select=hf.vision_feature_select_strategy,
        image_token_id=int(hf.image_token_id),
    )
    if hf.model_type == "llava_next":  # AnyRes: (height, width) pinpoints, spatial_unpad, newline
        values.update(
            image_grid_pinpoints=[list(p) for p in hf.image_grid_pinpoints], patch_merge="spatial_unpad"
        )
    if hf.projector_hidden_act != "gelu":
        raise CheckpointError(
            f"projector activation {hf.projector_hidden_act!r} is not supported (gelu only)"
        )
    return MultimodalConfig(**{**values, **overrides})


def _config_from_llava_qwen(
    raw: dict[str, Any], state: dict[str, torch.Tensor], folder: Path, overrides: dict[str, Any]
) -> MultimodalConfig:
    projector = raw.get("mm_projector_type", "linear")
    if projector not in ("mlp2x_gelu", "linear"):
        raise CheckpointError(f"projector type {projector!r} is not supported (mlp2x_gelu, linear)")
    vision = overrides.pop("vision", None) or _llava_qwen_vision(raw, folder)
    # The original tower drops trailing layers at build time; trust the weights for the count.
    layer_ids = {
        int(m.group(1)) for k in state if (m := re.search(r"vision_tower\..*encoder\.layers\.(\d+)\.", k))
    }
    if layer_ids:
        vision = {**vision, "num_hidden_layers": max(layer_ids) + 1}
    text = {
        k: v
        for k, v in raw.items()
        if not k.startswith(("mm_", "image_", "tokenizer_", "use_mm_", "unfreeze_"))
    }
    for key in ("architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        text.pop(key, None)
    text["model_type"] = "qwen2"
    is_siglip = "siglip" in vision.get("model_type", "")
    select = raw.get("mm_vision_select_feature", "patch")
    values = dict(
        vision=vision,
        text=text,
        projector=projector,
        vision_feature_layer=int(raw.get("mm_vision_select_layer", -1)),
        # The original SigLIP tower keeps all patches; CLIP's "patch" drops CLS.
        vision_feature_select="full" if is_siglip or select == "cls_patch" else "default",
        image_token_id=int(raw.get("image_token_index", DEFAULT_IMAGE_TOKEN_ID)),
        **_llava_qwen_anyres(raw, "model.image_newline" in state),
    )
    return MultimodalConfig(**{**values, **overrides})


def _llava_qwen_anyres(raw: dict[str, Any], has_newline: bool) -> dict[str, Any]:
    """The original's ``mm_patch_merge_type`` / ``image_aspect_ratio`` / ``image_grid_pinpoints``,
    kept: a model continued from it computes the positions it was trained with."""
    from mmscene.data.media.anyres import pinpoints_from_llava

    merge = str(raw.get("mm_patch_merge_type", "flat"))
    aspect = str(raw.get("image_aspect_ratio", "square"))
    if merge == "flat":
        return {"patch_merge": "flat"}
    if merge != "spatial_unpad" or not has_newline:
        raise CheckpointError(
            f"mm_patch_merge_type {merge!r} is not supported (flat, spatial_unpad with image_newline)"
        )
    out: dict[str, Any] = {"patch_merge": "spatial_unpad"}
    if aspect.startswith("anyres"):
        if aspect != "anyres":
            raise CheckpointError(
                f"image_aspect_ratio {aspect!r} is not supported (anyres; anyres_max_N is not)"
            )
        pinpoints = raw.get("image_grid_pinpoints")
        if not isinstance(pinpoints, list) or not pinpoints:
            raise CheckpointError(
                "image_aspect_ratio anyres without image_grid_pinpoints (a list of [width, height])"
            )
        out["image_grid_pinpoints"] = pinpoints_from_llava(pinpoints)
    return out


def _llava_qwen_vision(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    name = str(raw.get("mm_vision_tower", ""))
    for candidate in (Path(name), folder / name):
        if name and (candidate / "config.json").is_file():
            cfg = AutoConfig.from_pretrained(str(candidate), trust_remote_code=False)
            cfg = getattr(cfg, "vision_config", cfg)
            return hf_config_dict(cfg)
    if name in _SIGLIP_PRESETS:
        return load_preset(_SIGLIP_PRESETS[name])
    raise CheckpointError(
        f"cannot resolve the vision tower {name!r} of this llava_qwen checkpoint: give a local folder with its "
        "config.json as mm_vision_tower, or pass vision=<config dict or preset>"
    )


# ---------------------------------------------------------------------- saving
def save_pretrained(model: MultimodalLM, out_dir: str | Path, format: str = "mmscene", **kwargs: Any) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if format == "mmscene":
        _save_native(model, out, **kwargs)
    elif format == "llava-hf" and model.config.patch_merge == "spatial_unpad":
        from mmscene.model.export_llava_next import save_llava_next

        save_llava_next(model, out, **kwargs)
    elif format == "llava-hf":
        from mmscene.model.export_hf import save_llava_hf

        save_llava_hf(model, out, **kwargs)
    else:
        raise ValueError(f"unknown checkpoint format {format!r}; choose 'mmscene' or 'llava-hf'")
    return out


def unique_state(model: MultimodalLM) -> dict[str, torch.Tensor]:
    """The state dict without the tied copy of the embeddings (safetensors refuses shared storage)."""
    state = model.state_dict()
    if getattr(model.config.text_config, "tie_word_embeddings", False):
        state.pop("language_model.lm_head.weight", None)
    return state


def _save_native(model: MultimodalLM, out: Path, max_shard_size: str | int = "5GB") -> None:
    config = model.config
    config_dict = config.to_dict()
    for part in ("vision", "text"):
        if isinstance(config_dict[part], PretrainedConfig):
            config_dict[part] = hf_config_dict(config_dict[part])
    (out / "config.json").write_text(json.dumps(config_dict, indent=2))
    write_weights(unique_state(model), out, max_shard_size=max_shard_size)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(out))
