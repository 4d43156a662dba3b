"""Reading training checkpoints: a single Lightning file or a sharded (FSDP2) folder."""

from __future__ import annotations

import warnings
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
    """The model weights of a distributed checkpoint (torch.distributed.checkpoint) as one state
    dict; optimizer states stay on disk (only the model's tensors are planned and read).

    Public DCP API only (``read_metadata`` + ``dcp.load`` of a model-only state dict). Not
    ``format_utils.dcp_to_torch_save``: it materialises the optimizer states too (AdamW: twice
    the model again in host RAM) and writes them to a file before anything can be exported.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(folder))
    metadata = reader.read_metadata()
    model: dict[str, torch.Tensor] = {}
    for flat, path in metadata.planner_data.items():
        entry = metadata.state_dict_metadata.get(flat)
        if path[0] in ("state_dict", "model") and isinstance(entry, TensorStorageMetadata):
            name = ".".join(str(p) for p in path[1:])
            model[name] = torch.empty(entry.size, dtype=entry.properties.dtype)
    if not model:
        raise ValueError(f"{folder} is a distributed checkpoint without model weights")
    state = {"state_dict": model}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)
    meta_file = folder / "meta.pt"
    meta = torch.load(str(meta_file), map_location="cpu", weights_only=True) if meta_file.is_file() else {}
    return {
        **meta,
        "state_dict": {f"model.{k}" if not k.startswith("model.") else k: v for k, v in model.items()},
    }
