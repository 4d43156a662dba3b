from mmscene.model.config import MultimodalConfig, load_preset, preset_names
from mmscene.model.core import IGNORE_INDEX, MultimodalLM
from mmscene.model.formats import CheckpointError
from mmscene.model.projector import build_projector, register_projector

__all__ = [
    "IGNORE_INDEX",
    "CheckpointError",
    "MultimodalConfig",
    "MultimodalLM",
    "build_projector",
    "load_preset",
    "preset_names",
    "register_projector",
]
