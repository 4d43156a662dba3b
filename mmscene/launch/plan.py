"""``mmscene plan``: parameters, per-GPU memory under FSDP2 (vs. DDP) and activations, before launching.

The model is instantiated on the ``meta`` device (no memory, no weights), so real sizes plan in a
second on a laptop. The estimates, per GPU, with N = GPUs in a shard group (all GPUs, or the GPUs
of one node with hybrid sharding), P = all parameters, T = trainable parameters:

FSDP2 (``fully_shard`` per vision/decoder layer + the root), mixed precision:
  * master parameters, sharded:             P * master_bytes / N   (fp32: every part, frozen too)
  * gradients, sharded:                     T * master_bytes / N   (only trainable parameters)
  * AdamW (exp_avg, exp_avg_sq), sharded:   2 * T * master_bytes / N
  * gathered compute parameters:            param_bytes * (root + 2 * largest layer unit)
    (the root unit - embeddings, lm_head, projector, final norms - stays gathered from forward
    to backward; one layer is in use while the next is prefetched)
  * unsharded gradients before reduce-scatter: (param_bytes + reduce_bytes) * largest trainable unit
DDP (full replication): P * master_bytes + T * master_bytes (grads) + 2 * T * master_bytes (AdamW)
  + T * master_bytes (gradient buckets; ``gradient_as_bucket_view=False`` is Lightning's default).

Activations of one micro-batch of n tokens in rows of s tokens (hidden h, heads a, layers L,
vocabulary V), in 16-bit (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", no tensor/sequence parallelism). The micro-batch comes from the data config:
  * ``data.batch_size`` b samples of ``data.max_length`` tokens: s = max_length, n = b * s;
  * ``data.batching: {mode: tokens, pack: true}``: ``max_tokens // row_tokens`` rows of
    ``row_tokens`` (default ``max_tokens``): s = row length, n = rows * s (= max_tokens);
  * ``mode: tokens, pack: false``: n = max_tokens, s = the longest row allowed,
    min(max_length, max_tokens) (an upper bound: rows x longest <= max_tokens).
Then:
  * per decoder layer:  n*h*(34 + 5*a*s/h) bytes (= s*b*h*(34 + 5*a*s/h)); the 5*a*s/h term is
    the attention score / softmax / dropout tensors, which SDPA / flash attention never store
    (reported separately);
  * without checkpointing: L * per layer; with activation checkpointing of every layer: the
    layer inputs L * 2*n*h plus one layer recomputed in backward;
  * the attention mask of packed or padded rows (transformers' boolean block-causal / padding
    mask, rows * s * s bytes; none for a single unpadded row);
  * logits: n*V*(2 + 4) bytes (bf16 logits and their fp32 copy for the loss), and when backward
    starts, while they are still held, their gradients: another n*V*(4 + 2) bytes; with the fused
    loss (``loss_chunk_tokens`` = c) one chunk's c*V*(2 + 4) bytes, and V*h*4 + n*h*2 bytes of
    gradients made in forward;
  * vision tower (only when trained): the same formula with s = tokens per image, b = images
    (samples x images per sample; with a token budget, as many images as the budget holds).
These are estimates: allocator fragmentation, NCCL buffers and the CUDA context (~1-3 GiB) come
on top.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from mmscene.constants import MODEL_PARTS
from mmscene.data.pipeline.batching import TokenBudget

GiB = 1024**3
_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
_ATTR = {"vision": "vision_tower", "projector": "projector", "llm": "language_model"}


@dataclasses.dataclass
class Plan:
    nodes: int
    gpus_per_node: int
    shard_size: int
    hybrid: bool
    freeze: list[str]
    params: dict[str, dict[str, int]]  # part -> {"total", "trainable"}
    root_params: int
    largest_unit: int
    largest_trainable_unit: int
    num_units: int
    master_bytes: int
    param_bytes: int
    reduce_bytes: int
    fsdp: dict[str, int]
    ddp: dict[str, int]
    activations: dict[str, Any]
    activation_checkpointing: bool
    strategy: str | None = None  # the config's: "fsdp2", "ddp" or None (not known)
    lora: dict[str, Any] | None = None  # model.lora: adapters train instead of the LLM

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def total_params(self) -> int:
        return self.params["total"]["total"]

    @property
    def trainable_params(self) -> int:
        return self.params["total"]["trainable"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _dtype_bytes(name: str | None, default: int) -> int:
    if name is None:
        return default
    key = str(name).lower().removeprefix("torch.")
    if key not in _BYTES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_BYTES)}")
    return _BYTES[key]


def _unique(params) -> list[torch.nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def meta_model(config, freeze=("vision",), lora: dict[str, Any] | None = None):
    """The model on the meta device, with the parts' requires_grad as training would set them
    (with ``lora``: peft's adapters added, and only they train in the adapted parts)."""
    from mmscene.model import lora as lora_adapters
    from mmscene.model.core import MultimodalLM

    unknown = sorted(set(freeze) - set(MODEL_PARTS))
    if unknown:
        raise ValueError(f"freeze: unknown parts {unknown}; choose from {MODEL_PARTS}")
    with torch.device("meta"):
        model = MultimodalLM(config)
    lora = lora_adapters.check(lora)
    if lora is not None:
        lora_adapters.add_adapters(model, lora)
    for part in MODEL_PARTS:  # as MMSceneModule.configure_model does
        getattr(model, _ATTR[part]).requires_grad_(part not in freeze)
    if lora is not None:
        lora_adapters.set_trainable(model, lora, {_ATTR[p]: p not in freeze for p in MODEL_PARTS})
    if hasattr(model, "freeze_unused"):
        model.freeze_unused()
    return model


def parameter_counts(model) -> dict[str, dict[str, int]]:
    """``{part: {"total", "trainable"}}`` for vision / projector / llm and their total."""
    params: dict[str, dict[str, int]] = {}
    seen: set[int] = set()
    for part in MODEL_PARTS:
        own = [p for p in _unique(getattr(model, _ATTR[part]).parameters()) if id(p) not in seen]
        seen.update(id(p) for p in own)
        params[part] = {
            "total": sum(p.numel() for p in own),
            "trainable": sum(p.numel() for p in own if p.requires_grad),
        }
    params["total"] = {k: sum(params[p][k] for p in MODEL_PARTS) for k in ("total", "trainable")}
    return params


def layer_activation_bytes(
    tokens: int, s: int, h: int, a: int, act_bytes: int = 2, scores: bool = True
) -> int:
    """Korthikanti et al.: n*h*(34 + 5*a*s/h) bytes per layer in 16-bit, n tokens in rows of s."""
    per = tokens * h * 34 + (5 * a * s * tokens if scores else 0)
    return per * act_bytes // 2


def micro_batch_shape(max_length: int, micro_batch: int, budget: TokenBudget | None) -> dict[str, Any]:
    """The shape of one training micro-batch: tokens, row length, rows, and rows with a mask."""
    if budget is None:
        s, rows = max_length, micro_batch
        mask_rows = rows if rows > 1 else 0  # padded rows; one unpadded row needs no mask
        return dict(mode="samples", tokens=s * rows, row_length=s, rows=rows, mask_rows=mask_rows)
    shape: dict[str, Any] = dict(
        mode="tokens", max_tokens=budget.max_tokens, pack=budget.pack, row_tokens=budget.row_tokens
    )
    if budget.pack:  # full rows of row_capacity, each with its block-causal mask
        s, rows = budget.row_capacity, budget.rows
        shape.update(tokens=s * rows, row_length=s, rows=rows, mask_rows=rows)
    else:  # the longest rows allowed, as many as the budget takes
        s = min(max_length, budget.max_tokens)
        rows = budget.max_tokens // s
        shape.update(tokens=budget.max_tokens, row_length=s, rows=rows, mask_rows=rows if rows > 1 else 0)
    return shape


def plan(
    config,
    *,
    nodes: int,
    gpus_per_node: int,
    freeze: list[str] | tuple[str, ...] = ("vision",),
    max_length: int = 4096,
    micro_batch: int = 1,
    batching: TokenBudget | None = None,
    images_per_sample: int = 1,
    param_dtype: str | None = "bfloat16",
    reduce_dtype: str | None = "float32",
    master_dtype: str = "float32",
    hybrid: bool = False,
    activation_checkpointing: bool = False,
    strategy: str | None = None,
    loss_chunk_tokens: int | None = None,
    lora: dict[str, Any] | None = None,
) -> Plan:
    """Parameter counts and memory estimates for ``config`` (a MultimodalConfig) on nodes x GPUs.

    ``batching`` (``data.batching`` in tokens mode) replaces ``micro_batch`` samples of
    ``max_length`` tokens by a token budget. ``loss_chunk_tokens``: the chunk of training's fused
    loss (``model.loss_chunk_tokens``); None plans full logits (``model.loss_kernel: plain``, and
    the loss the GPU peaks in docs/slurm.md were measured with).
    """
    from mmscene.train.sharding import shard_units

    if nodes < 1 or gpus_per_node < 1 or max_length < 1 or micro_batch < 1 or images_per_sample < 0:
        raise ValueError("nodes, gpus_per_node, max_length and micro_batch must be >= 1")
    model = meta_model(config, freeze, lora)
    params = parameter_counts(model)
    P, T = params["total"]["total"], params["total"]["trainable"]

    units = shard_units(model)
    in_units: set[int] = set()
    unit_sizes, unit_trainable = [], []
    for unit in units:
        own = _unique(unit.parameters())
        in_units.update(id(p) for p in own)
        unit_sizes.append(sum(p.numel() for p in own))
        unit_trainable.append(sum(p.numel() for p in own if p.requires_grad))
    root = [p for p in _unique(model.parameters()) if id(p) not in in_units]
    root_params = sum(p.numel() for p in root)
    root_trainable = sum(p.numel() for p in root if p.requires_grad)

    m = _dtype_bytes(master_dtype, 4)
    pb = _dtype_bytes(param_dtype, m)
    rb = _dtype_bytes(reduce_dtype, pb)
    n = gpus_per_node if hybrid else nodes * gpus_per_node
    largest = max(unit_sizes, default=0)
    largest_trainable = max([root_trainable, *unit_trainable])
    fsdp = {
        "params": _ceil(P * m, n),
        "grads": _ceil(T * m, n),
        "optimizer": _ceil(2 * T * m, n),
        "gathered": pb * (root_params + 2 * largest),
        "unsharded_grads": (pb + rb) * largest_trainable,
    }
    fsdp["states"] = fsdp["params"] + fsdp["grads"] + fsdp["optimizer"]
    fsdp["total_without_activations"] = fsdp["states"] + fsdp["gathered"] + fsdp["unsharded_grads"]
    ddp = {"params": P * m, "grads": T * m, "optimizer": 2 * T * m, "buckets": T * m}
    ddp["total_without_activations"] = sum(ddp.values())

    shape = micro_batch_shape(max_length, micro_batch, batching)
    acts = activations(
        model, freeze, shape, images_per_sample, act_bytes=2 if pb == 2 else m, loss_chunk=loss_chunk_tokens
    )
    acts.update(max_length=max_length, micro_batch=micro_batch if batching is None else None)
    key = "checkpointed" if activation_checkpointing else "full"
    for table in (fsdp, ddp):
        table["activations"] = acts[key]["total"]
        table["total"] = table["total_without_activations"] + table["activations"]
        table["total_sdpa"] = table["total_without_activations"] + acts[key]["total_sdpa"]
    return Plan(
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        shard_size=n,
        hybrid=hybrid,
        freeze=sorted(freeze),
        params=params,
        root_params=root_params,
        largest_unit=largest,
        largest_trainable_unit=largest_trainable,
        num_units=len(units),
        master_bytes=m,
        param_bytes=pb,
        reduce_bytes=rb,
        fsdp=fsdp,
        ddp=ddp,
        activations=acts,
        activation_checkpointing=activation_checkpointing,
        strategy=strategy,
        lora=lora,
    )


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def activations(
    model,
    freeze,
    shape: dict[str, Any],
    images_per_sample: int,
    act_bytes: int = 2,
    loss_chunk: int | None = None,
) -> dict[str, Any]:
    """Activation bytes of one micro-batch of ``shape`` (see :func:`micro_batch_shape`)."""
    text = model.config.text_config
    h, a, L, V = text.hidden_size, text.num_attention_heads, text.num_hidden_layers, text.vocab_size
    n, s = shape["tokens"], shape["row_length"]
    layer = layer_activation_bytes(n, s, h, a, act_bytes)
    layer_sdpa = layer_activation_bytes(n, s, h, a, act_bytes, scores=False)
    mask = shape["mask_rows"] * s * s  # boolean, shared by every layer
    if loss_chunk is None:
        logits = n * V * (act_bytes + 4)
        # Backward begins with the loss's fp32 gradient and its bf16 cast while the logits are still
        # held: the peak of a step (measured on an H200 with the 0.5B config, see docs/slurm.md).
        logits_grad = n * V * (4 + act_bytes)
    else:
        # The fused loss (mmscene.model.token_loss): one chunk's logits in the model's dtype and
        # fp32 at a time; the head's fp32 gradient and the hidden states' gradient made in forward.
        logits = min(n, loss_chunk) * V * (act_bytes + 4)
        logits_grad = V * h * 4 + n * h * act_bytes
    inputs = L * n * h * act_bytes  # what checkpointing keeps: each layer's input
    out: dict[str, Any] = {
        "batching": shape,
        "tokens": n,
        "row_length": s,
        "rows": shape["rows"],
        "llm_layer": layer,
        "llm_layer_sdpa": layer_sdpa,
        "mask": mask,
        "logits": logits,
        "logits_grad": logits_grad,
    }
    vis = model.config.vision_config
    sv = model.tokens_per_image()
    if shape["mode"] == "samples":
        images = shape["rows"] * images_per_sample
    else:  # a budget holds at most this many (unpooled) images
        images = n // sv if images_per_sample else 0
    if "vision" not in freeze and images:
        v_layer = layer_activation_bytes(sv * images, sv, vis.hidden_size, vis.num_attention_heads, act_bytes)
        v_layer_sdpa = layer_activation_bytes(
            sv * images, sv, vis.hidden_size, vis.num_attention_heads, act_bytes, False
        )
        v_layers = vis.num_hidden_layers
        v_inputs = v_layers * sv * images * vis.hidden_size * act_bytes
    else:  # a frozen tower keeps nothing for backward: no gradient flows into it
        v_layer = v_layer_sdpa = v_layers = v_inputs = 0
    out.update(
        images=images, vision_tokens_per_image=sv, vision_layer=v_layer, vision_layer_sdpa=v_layer_sdpa
    )
    out["full"] = {
        "llm": L * layer,
        "llm_sdpa": L * layer_sdpa,
        "vision": v_layers * v_layer,
        "vision_sdpa": v_layers * v_layer_sdpa,
    }
    out["checkpointed"] = {
        "llm": inputs + layer,
        "llm_sdpa": inputs + layer_sdpa,
        "vision": v_inputs + v_layer if v_layers else 0,
        "vision_sdpa": v_inputs + v_layer_sdpa if v_layers else 0,
    }
    for key in ("full", "checkpointed"):
        table = out[key]
        table["stored"] = table["llm"] + table["vision"] + mask + logits
        table["stored_sdpa"] = table["llm_sdpa"] + table["vision_sdpa"] + mask + logits
        table["total"] = table["stored"] + logits_grad
        table["total_sdpa"] = table["stored_sdpa"] + logits_grad
    return out
