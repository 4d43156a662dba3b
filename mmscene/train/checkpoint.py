"""Reading training checkpoints: a single Lightning file or a sharded (FSDP2) folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def read_training_checkpoint(path: Path) -> dict[str, Any]:
    if path.is_dir():
        return _read_sharded(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _read_sharded(folder: Path) -> dict[str, Any]:
    """Consolidate a distributed checkpoint (torch.distributed.checkpoint) into one state dict."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    _load_state_dict(
        state,
        storage_reader=FileSystemReader(str(folder)),
        planner=_EmptyStateDictLoadPlanner(),
        no_dist=True,
    )
    meta_file = folder / "meta.pt"
    meta = torch.load(str(meta_file), map_location="cpu", weights_only=True) if meta_file.is_file() else {}
    model_state = state.get("model", state.get("state_dict", {}))
    return {
        **meta,
        "state_dict": {f"model.{k}" if not k.startswith("model.") else k: v for k, v in model_state.items()},
    }
