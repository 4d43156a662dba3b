"""mmscene: LLaVA-NeXT-Interleave-style multimodal training and evaluation."""

from mmscene.model import IGNORE_INDEX, CheckpointError, MultimodalConfig, MultimodalLM, register_projector

__version__ = "0.1.0"

__all__ = [
    "IGNORE_INDEX",
    "CheckpointError",
    "MultimodalConfig",
    "MultimodalLM",
    "register_projector",
    "__version__",
]
