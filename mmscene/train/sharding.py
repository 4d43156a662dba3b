"""FSDP2 (``fully_shard``) through Lightning's ModelParallelStrategy.

One FSDP unit per LLM decoder layer and per vision encoder layer, the rest at the root. Frozen
parts (the vision tower in the paper's recipe) shard like the others: FSDP2 shards per parameter
and leaves ``requires_grad=False`` tensors without gradients.

Loading without a full copy per rank (torchtitan's meta-device recipe): every rank builds the
model's skeleton with parameters on the meta device, shards it, and allocates only its own
slices; rank 0 alone builds the full model (weights read once) and
``set_model_state_dict(..., broadcast_from_rank0=True)`` sends each tensor's slices out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, None: None}


def is_model_parallel(module) -> bool:
    from lightning.pytorch.strategies import ModelParallelStrategy

    trainer = getattr(module, "_trainer", None)
    return trainer is not None and isinstance(trainer.strategy, ModelParallelStrategy)


def data_parallel_group(module):
    """The process group over which gradients are averaged (None in a single process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if is_model_parallel(module):
        return module.device_mesh["data_parallel"].get_group()
    return dist.group.WORLD


def check_options(cfg: dict[str, Any]) -> None:
    unknown = sorted(set(cfg) - {"param_dtype", "reduce_dtype", "reshard_after_forward", "hybrid"})
    if unknown:
        raise ValueError(f"model.fsdp: unknown keys {unknown}")


def build_sharded(
    rank: int,
    build_full: Callable[[], torch.nn.Module],
    build_skeleton: Callable[[], torch.nn.Module],
    mesh,
    cfg: dict[str, Any],
    device,
) -> torch.nn.Module:
    """The sharded model, its weights read by rank 0 only (``build_full``) and broadcast."""
    full = build_full() if rank == 0 else None
    model = build_skeleton()
    shard(model, mesh, cfg)
    load_into_shards(model, None if full is None else full.state_dict(), device)
    return model


def shard(model: torch.nn.Module, mesh, cfg: dict[str, Any]) -> None:
    """``fully_shard`` the core in place (its parameters may still be on meta)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    check_options(cfg)
    policy = MixedPrecisionPolicy(
        param_dtype=_DTYPES[cfg.get("param_dtype")], reduce_dtype=_DTYPES[cfg.get("reduce_dtype", "float32")]
    )
    kwargs = dict(mesh=mesh, mp_policy=policy, reshard_after_forward=cfg.get("reshard_after_forward", True))
    from torch.distributed.fsdp import register_fsdp_forward_method

    from mmscene.model.token_loss import attach_head_loss

    head = model.language_model.get_output_embeddings()
    for layer in shard_units(model):
        fully_shard(layer, **kwargs)
        if layer is head:  # the training loss uses the head outside its forward
            register_fsdp_forward_method(head, attach_head_loss(head))
    fully_shard(model, **kwargs)


@contextlib.contextmanager
def meta_parameters():
    """Parameters are created on the meta device, buffers where they would be.

    Non-persistent buffers (rotary frequencies, position ids) are in no state dict, so they must
    be real from the start; ``torch.device("meta")`` would leave them empty. (accelerate's
    ``init_empty_weights(include_buffers=False)`` does the same; it is not a dependency here.)
    """
    register = torch.nn.Module.register_parameter

    def to_meta(self, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    torch.nn.Module.register_parameter = to_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def load_into_shards(model: torch.nn.Module, full_state: dict[str, torch.Tensor] | None, device) -> None:
    """Allocate this rank's slices of a sharded meta skeleton and fill them from rank 0's
    ``full_state`` (None on the other ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_state_dict(model, full_state or {}, options=options)


def shard_units(model) -> list[torch.nn.Module]:
    units = model.blocks()
    lm = model.language_model
    if not getattr(lm.config, "tie_word_embeddings", False):
        # Untied embeddings and LM head are large (1.2B parameters at 7B): give each its own
        # unit so the root does not hold them whole. Tied ones share a tensor and stay at the root.
        units += [lm.get_input_embeddings(), lm.get_output_embeddings()]
    return units


def mesh_of(module, cfg: dict[str, Any]):
    """The data-parallel mesh of Lightning's ModelParallelStrategy, or its 2-D HSDP form."""
    return _mesh(module, bool(cfg.get("hybrid", False)))


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
