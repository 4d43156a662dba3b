"""mmscene: LLaVA-NeXT-Interleave-style multimodal training and evaluation."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Loaded on first use so that `import mmscene` (and the CLI's data tools) stay fast.
_EXPORTS = {
    "IGNORE_INDEX": "mmscene.constants",
    "MultimodalLM": "mmscene.model.core",
    "MultimodalConfig": "mmscene.model.config",
    "CheckpointError": "mmscene.model.config",
    "load_pretrained": "mmscene.model.formats",
    "save_pretrained": "mmscene.model.formats",
    "compose": "mmscene.model.compose",
    "register_projector": "mmscene.model.projector",
    "Scenario": "mmscene.scenario",
    "Example": "mmscene.scenario",
    "Prompt": "mmscene.scenario",
    "SkipSample": "mmscene.skips",
    "IMAGE_PLACEHOLDER": "mmscene.constants",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mmscene' has no attribute {name!r}")
