"""Reading and writing safetensors weight folders (single file or sharded with an index)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def weight_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    if (folder / INDEX).is_file():
        index = json.loads((folder / INDEX).read_text())
        return [folder / name for name in sorted(set(index["weight_map"].values()))]
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = (
        f" (found {pickles}: convert them to safetensors; pickled weights are not loaded)" if pickles else ""
    )
    raise FileNotFoundError(f"no safetensors weights in {folder}{hint}")


class LazyWeights:
    """Names and shapes of a weight folder's tensors; each tensor is read only when asked for,
    so a model loads with one tensor in flight instead of a second copy of every weight."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in weight_files(folder):
            with safe_open(str(file), "pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    self.where[key] = file
                    self.shapes[key] = tuple(f.get_slice(key).get_shape())

    def read(self, keys: dict[str, str]):
        """``(name, tensor)`` for each ``name -> stored key`` of ``keys``, one tensor at a time,
        each file opened once."""
        from safetensors import safe_open

        by_file: dict[Path, list[tuple[str, str]]] = {}
        for name, stored in keys.items():
            by_file.setdefault(self.where[stored], []).append((name, stored))
        for file, wanted in by_file.items():
            with safe_open(str(file), "pt") as f:
                for name, stored in wanted:
                    yield name, f.get_tensor(stored)


def write_weights(state: dict[str, torch.Tensor], folder: Path, max_shard_size: str | int = "5GB") -> None:
    """Write ``state`` as safetensors; shared (tied) tensors must be removed by the caller."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file(
            {k: state[k].detach().contiguous().cpu() for k in keys},
            str(folder / filename),
            metadata={"format": "pt"},
        )
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / INDEX).write_text(json.dumps(index, indent=2))
