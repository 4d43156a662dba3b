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


def load_module_from_checkpoint(path: str | Path):
    """The trained module from a Lightning checkpoint file or a sharded (distributed) checkpoint folder."""
    from mmscene.train.building import skeleton
    from mmscene.train.module import MMSceneModule

    ckpt = read_training_checkpoint(Path(path))
    hparams = {
        k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")
    }  # drop CLI bookkeeping
    hparams.pop("attn_implementation", None)  # a kernel choice of the training machine, not of the weights
    module = MMSceneModule(**hparams)
    state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if module.strict_loading:
        # The checkpoint holds every weight: build on meta and take its tensors (no init, no
        # copy, no pretrained weights read again).
        module.model = module._adapt(skeleton(module.model_config, module.attn_implementation))
        missing, unexpected = module.model.load_state_dict(state, strict=False, assign=True)
    else:
        # LoRA over a pretrained base: the base from `model`, the trained weights from here.
        module.configure_model()
        missing, unexpected = module.model.load_state_dict(state, strict=False)
        trained = {n for n, p in module.model.named_parameters() if p.requires_grad}
        missing = [k for k in missing if k in trained]
    tied = getattr(module.model_config.text_config, "tie_word_embeddings", False)
    if tied:
        module.model.language_model.tie_weights()
    missing = [k for k in missing if not (tied and k == "language_model.lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match its model: missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    return module, ckpt
