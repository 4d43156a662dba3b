"""LoRA adapters on the LLM (and optionally the vision tower), through peft.

``inject_adapter_in_model`` puts peft's LoRA layers into the modules in place, so the core keeps
its structure (``language_model.model.layers`` ...) and FSDP2 shards the adapted blocks like the
plain ones; parameter names gain peft's ``base_layer`` / ``lora_A.default`` parts. Merging folds
``B @ A * alpha / r`` into each base weight and puts the base layers back, which gives the plain
model transformers loads.
"""

from __future__ import annotations

from typing import Any

from torch import nn

KEYS = ("r", "alpha", "dropout", "target_modules", "tower", "tower_target_modules")
LLM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOWER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]  # SigLIP / CLIP
ADAPTER = "default"


def check(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """``model.lora`` with defaults filled in, or None (full fine-tuning)."""
    if not spec:
        return None
    if not isinstance(spec, dict):
        raise ValueError(f"model.lora must be a mapping with keys {KEYS}, got {spec!r}")
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise ValueError(f"model.lora: unknown keys {unknown} (allowed: {', '.join(KEYS)})")
    out = {
        "r": 16,
        "alpha": 32,
        "dropout": 0.05,
        "target_modules": list(LLM_TARGETS),
        "tower": False,
        "tower_target_modules": list(TOWER_TARGETS),
        **spec,
    }
    if int(out["r"]) < 1:
        raise ValueError(f"model.lora.r must be >= 1, got {out['r']}")
    return out


def peft_config(spec: dict[str, Any], targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(
        r=int(spec["r"]),
        lora_alpha=float(spec["alpha"]),
        lora_dropout=float(spec["dropout"]),
        target_modules=list(targets),
        bias="none",
    )


def add_adapters(model, spec: dict[str, Any]) -> None:
    """Inject LoRA layers into the LLM (and the tower with ``tower: true``), in place."""
    try:
        from peft import inject_adapter_in_model
    except ImportError as err:
        raise ValueError("model.lora needs peft: pip install 'mmscene[lora]'") from err
    inject_adapter_in_model(peft_config(spec, spec["target_modules"]), model.language_model, ADAPTER)
    if spec["tower"]:
        inject_adapter_in_model(peft_config(spec, spec["tower_target_modules"]), model.vision_tower, ADAPTER)


def is_adapter_parameter(name: str) -> bool:
    return ".lora_" in name


def set_trainable(model, spec: dict[str, Any], trained_parts: dict[str, bool]) -> None:
    """Adapted parts train only their adapters; the projector (and any part without adapters)
    follows ``trained_parts``."""
    adapted = {"language_model"} | ({"vision_tower"} if spec["tower"] else set())
    for part, trains in trained_parts.items():
        module: nn.Module = getattr(model, part)
        for name, p in module.named_parameters():
            p.requires_grad_(is_adapter_parameter(name) if part in adapted else trains)


def merge_adapters(model) -> None:
    """Fold every LoRA layer into its base weight and put the base layer back (in place)."""
    from peft.tuners.lora import LoraLayer

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                child.merge()
                setattr(parent, child_name, child.get_base_layer())


def save_llm_adapter(model, spec: dict[str, Any], out: str) -> str:
    """The LLM's adapters as a peft adapter folder (``adapter_config.json`` +
    ``adapter_model.safetensors``): ``PeftModel.from_pretrained(llm, out)`` loads them onto the
    base LLM."""
    from pathlib import Path

    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    config = peft_config(spec, spec["target_modules"])
    config.base_model_name_or_path = None
    config.save_pretrained(str(folder))
    state = get_peft_model_state_dict(model.language_model, adapter_name=ADAPTER)
    # peft's own files name tensors from the PeftModel wrapper down
    state = {f"base_model.model.{k}": v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return str(folder)
