from mmscene.model.compose import compose
from mmscene.model.config import CheckpointError, MultimodalConfig, load_preset, preset_names
from mmscene.model.core import IGNORE_INDEX, MultimodalLM
from mmscene.model.formats import load_pretrained, save_pretrained
from mmscene.model.projector import build_projector, register_projector

__all__ = [
    "IGNORE_INDEX",
    "CheckpointError",
    "MultimodalConfig",
    "MultimodalLM",
    "build_projector",
    "compose",
    "load_pretrained",
    "load_preset",
    "preset_names",
    "register_projector",
    "save_pretrained",
]
