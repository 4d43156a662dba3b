"""FSDP2 (``fully_shard``) through Lightning's ModelParallelStrategy.

One FSDP unit per LLM decoder layer and per vision encoder layer, the rest at the root. Frozen
parts (the vision tower in the paper's recipe) shard like the others: FSDP2 shards per parameter
and leaves ``requires_grad=False`` tensors without gradients.
"""

from __future__ import annotations

from typing import Any

import torch

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, None: None}


def maybe_shard(module, cfg: dict[str, Any]) -> bool:
    from lightning.pytorch.strategies import ModelParallelStrategy

    trainer = getattr(module, "_trainer", None)
    if trainer is None or not isinstance(trainer.strategy, ModelParallelStrategy):
        return False
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    unknown = sorted(set(cfg) - {"param_dtype", "reduce_dtype", "reshard_after_forward", "hybrid"})
    if unknown:
        raise ValueError(f"model.fsdp: unknown keys {unknown}")
    mesh = _mesh(module, bool(cfg.get("hybrid", False)))
    policy = MixedPrecisionPolicy(
        param_dtype=_DTYPES[cfg.get("param_dtype")], reduce_dtype=_DTYPES[cfg.get("reduce_dtype", "float32")]
    )
    kwargs = dict(mesh=mesh, mp_policy=policy, reshard_after_forward=cfg.get("reshard_after_forward", True))
    model = module.model
    for layer in shard_units(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return True


def shard_units(model) -> list[torch.nn.Module]:
    units = list(getattr(getattr(model.vision_tower, "encoder", None), "layers", []))
    units += list(model.language_model.model.layers)
    lm = model.language_model
    if not getattr(lm.config, "tie_word_embeddings", False):
        # Untied embeddings and LM head are large (1.2B parameters at 7B): give each its own
        # unit so the root does not hold them whole. Tied ones share a tensor and stay at the root.
        units += [lm.get_input_embeddings(), lm.get_output_embeddings()]
    return units


def _mesh(module, hybrid: bool):
    mesh = module.device_mesh["data_parallel"]
    if not hybrid:
        return mesh
    from torch.distributed.device_mesh import init_device_mesh

    trainer = module.trainer
    nodes, per_node = trainer.num_nodes, trainer.num_devices
    if nodes * per_node != mesh.size():
        raise ValueError(
            f"hybrid sharding needs num_nodes x devices = {nodes} x {per_node} = data-parallel size {mesh.size()}"
        )
    # Shard within a node, replicate across nodes (HSDP).
    return init_device_mesh(mesh.device_type, (nodes, per_node), mesh_dim_names=("replicate", "shard"))
