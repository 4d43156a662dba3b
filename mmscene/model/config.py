"""Model configuration: which vision tower, projector and LLM, and how they connect.

Sub-model configs are plain transformers config dicts, so any vision model or causal LM that
transformers knows can be plugged in. Named presets live as JSON files in ``configs/``.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from transformers import AutoConfig, PretrainedConfig

FORMAT_NAME = "mmscene"
FORMAT_VERSION = 1
# The id transformers' llava-interleave checkpoints give to "<image>" (Qwen vocab + 1).
DEFAULT_IMAGE_TOKEN_ID = 151646


def preset_names() -> list[str]:
    return sorted(
        p.name[:-5] for p in resources.files("mmscene.model.configs").iterdir() if p.name.endswith(".json")
    )


def load_preset(name: str) -> dict[str, Any]:
    """A sub-model config by preset name (``qwen1.5-0.5b-chat``) or path to a config.json."""
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    ref = resources.files("mmscene.model.configs") / f"{name}.json"
    if not ref.is_file():
        raise ValueError(f"unknown model config preset {name!r}; known presets: {', '.join(preset_names())}")
    return json.loads(ref.read_text())


def to_hf_config(spec: dict[str, Any] | str | PretrainedConfig) -> PretrainedConfig:
    """A transformers config from a dict with ``model_type``, a preset name or a config object."""
    if isinstance(spec, PretrainedConfig):
        return spec
    if isinstance(spec, str):
        spec = load_preset(spec)
    spec = dict(spec)
    model_type = spec.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"sub-model config needs a 'model_type' key, got keys {sorted(spec)}")
    return AutoConfig.for_model(model_type, **spec)


@dataclasses.dataclass
class MultimodalConfig:
    """Everything needed to rebuild a :class:`~mmscene.MultimodalLM` from scratch.

    vision / text: transformers config dicts (or preset names) of the vision tower and the LLM.
    projector: name in the projector registry (``mlp2x_gelu`` is the paper's).
    vision_feature_layer: which hidden state of the tower feeds the projector (-1 = last kept layer).
    vision_feature_select: ``full`` keeps every token, ``default`` drops the first (CLS) token.
    image_token_id: the id that marks one image position in ``input_ids``.
    frame_pool_stride: average-pool the patch grid of pooled images (video frames) by this stride.
    image_grid_pinpoints: AnyRes resolutions ``[[height, width], ...]`` (multiples of the tower's
        image size) for images given with their size; None: every image is one crop.
    patch_merge: ``flat`` (features as the tower gives them) or ``spatial_unpad`` (LLaVA-NeXT:
        AnyRes grids unpadded, a learned ``image_newline`` ending each row, and one after each
        single-crop image); see :mod:`mmscene.model.anyres`.
    anyres_rounding: unpad's rounding rule, ``transformers`` or ``llava``.
    """

    vision: dict[str, Any] | str = "siglip-so400m-patch14-384-26l"
    text: dict[str, Any] | str = "qwen1.5-0.5b-chat"
    projector: str = "mlp2x_gelu"
    projector_bias: bool = True
    vision_feature_layer: int = -1
    vision_feature_select: Literal["full", "default"] = "full"
    image_token_id: int = DEFAULT_IMAGE_TOKEN_ID
    frame_pool_stride: int = 1
    image_grid_pinpoints: list[list[int]] | None = None
    patch_merge: Literal["flat", "spatial_unpad"] = "flat"
    anyres_rounding: Literal["transformers", "llava"] = "transformers"

    def __post_init__(self) -> None:
        if isinstance(self.vision, str):
            self.vision = load_preset(self.vision)
        if isinstance(self.text, str):
            self.text = load_preset(self.text)
        if self.vision_feature_select not in ("full", "default"):
            raise ValueError(
                f"vision_feature_select must be 'full' or 'default', got {self.vision_feature_select!r}"
            )
        if self.frame_pool_stride < 1:
            raise ValueError(f"frame_pool_stride must be >= 1, got {self.frame_pool_stride}")
        if self.patch_merge not in ("flat", "spatial_unpad"):
            raise ValueError(f"patch_merge must be 'flat' or 'spatial_unpad', got {self.patch_merge!r}")
        if self.image_grid_pinpoints is not None:
            if self.patch_merge != "spatial_unpad":
                raise ValueError("image_grid_pinpoints (AnyRes) needs patch_merge: spatial_unpad")
            size = int(self.vision_config.image_size)
            bad = [p for p in self.image_grid_pinpoints if len(p) != 2 or p[0] % size or p[1] % size]
            if bad or not self.image_grid_pinpoints:
                raise ValueError(
                    f"image_grid_pinpoints must be [height, width] multiples of {size}, got {bad}"
                )
            self.image_grid_pinpoints = [[int(h), int(w)] for h, w in self.image_grid_pinpoints]

    @property
    def vision_config(self) -> PretrainedConfig:
        return to_hf_config(self.vision)

    @property
    def text_config(self) -> PretrainedConfig:
        return to_hf_config(self.text)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MultimodalConfig:
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        data.pop("format", None)
        if version > FORMAT_VERSION:
            raise ValueError(
                f"checkpoint format version {version} is newer than this mmscene ({FORMAT_VERSION})"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown keys in mmscene model config: {unknown}")
        return cls(**data)


def hf_config_dict(config: PretrainedConfig) -> dict[str, Any]:
    """A compact dict of a transformers config that ``to_hf_config`` turns back into it."""
    data = config.to_diff_dict()
    for key in ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype"):
        data.pop(key, None)
    data["model_type"] = config.model_type
    return data


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read as a model."""
