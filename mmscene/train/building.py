"""How the module's core is built: from configs, a pretrained directory, or two components."""

from __future__ import annotations

from typing import Any

from mmscene.model import compose, load_pretrained
from mmscene.model.config import MultimodalConfig
from mmscene.model.core import MultimodalLM
from mmscene.train import sharding


def model_config(spec: dict[str, Any]) -> MultimodalConfig:
    kinds = sorted(set(spec) & {"config", "pretrained", "components"})
    if len(kinds) != 1:
        raise ValueError(f"model: give exactly one of config / pretrained / components, got {sorted(spec)}")
    if "config" in spec:
        return MultimodalConfig(**spec["config"])
    if "pretrained" in spec:
        from mmscene.model.formats import read_config

        return read_config(spec["pretrained"], **spec.get("overrides", {}))
    from transformers import AutoConfig

    from mmscene.model.config import hf_config_dict

    comp = dict(spec["components"])
    vision = AutoConfig.from_pretrained(str(comp["vision"]), trust_remote_code=False)
    vision = getattr(vision, "vision_config", vision)
    vision.num_hidden_layers -= int(comp.get("drop_vision_layers", 1))
    text = AutoConfig.from_pretrained(str(comp["llm"]), trust_remote_code=False)
    extra = {k: v for k, v in comp.items() if k not in ("vision", "llm", "drop_vision_layers")}
    return MultimodalConfig(vision=hf_config_dict(vision), text=hf_config_dict(text), **extra)


def build_model(
    spec: dict[str, Any], config: MultimodalConfig, attn_implementation: str | None = None
) -> MultimodalLM:
    """The full model with its weights (random for ``config``, read for the others)."""
    if "config" in spec:
        return MultimodalLM(config, attn_implementation)
    if "pretrained" in spec:
        return load_pretrained(
            spec["pretrained"], attn_implementation=attn_implementation, **spec.get("overrides", {})
        )
    comp = dict(spec["components"])
    return compose(comp.pop("vision"), comp.pop("llm"), attn_implementation=attn_implementation, **comp)


def skeleton(config: MultimodalConfig, attn_implementation: str | None = None) -> MultimodalLM:
    """The model with parameters on the meta device (no weights read, none allocated)."""
    from mmscene.model.formats import build_empty

    with sharding.meta_parameters():
        return build_empty(config, attn_implementation=attn_implementation)
