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

Activations for sequence length s (``data.max_length``), micro-batch b (``data.batch_size``),
hidden h, heads a, layers L, vocabulary V, in 16-bit (Korthikanti et al. 2022, "Reducing
Activation Recomputation in Large Transformer Models", no tensor/sequence parallelism):
  * per decoder layer:  s*b*h*(34 + 5*a*s/h) bytes; the 5*a*s/h term is the attention score /
    softmax / dropout tensors, which SDPA / flash attention never store (reported separately);
  * without checkpointing: L * per layer; with activation checkpointing of every layer: the
    layer inputs L * 2*s*b*h plus one layer recomputed in backward;
  * logits: s*b*V*(2 + 4) bytes (bf16 logits and their fp32 copy for the loss), and when backward
    starts, while they are still held, their gradients: another s*b*V*(4 + 2) bytes;
  * vision tower (only when trained): the same formula with s = tokens per image, b = images.
These are estimates: allocator fragmentation, NCCL buffers and the CUDA context (~1-3 GiB) come
on top.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

GiB = 1024**3
_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
PARTS = ("vision", "projector", "llm")
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


def meta_model(config):
    """The model on the meta device, with the parts' requires_grad as training would set them."""
    from mmscene.model.core import MultimodalLM

    with torch.device("meta"):
        return MultimodalLM(config)


def layer_activation_bytes(s: int, b: int, h: int, a: int, act_bytes: int = 2, scores: bool = True) -> int:
    """Korthikanti et al.: s*b*h*(34 + 5*a*s/h) bytes per transformer layer in 16-bit."""
    per = s * b * h * 34 + (5 * a * s * s * b if scores else 0)
    return per * act_bytes // 2


def plan(
    config,
    *,
    nodes: int,
    gpus_per_node: int,
    freeze: list[str] | tuple[str, ...] = ("vision",),
    max_length: int = 4096,
    micro_batch: int = 1,
    images_per_sample: int = 1,
    param_dtype: str | None = "bfloat16",
    reduce_dtype: str | None = "float32",
    master_dtype: str = "float32",
    hybrid: bool = False,
    activation_checkpointing: bool = False,
) -> Plan:
    """Parameter counts and memory estimates for ``config`` (a MultimodalConfig) on nodes x GPUs."""
    from mmscene.train.sharding import shard_units

    if nodes < 1 or gpus_per_node < 1 or max_length < 1 or micro_batch < 1 or images_per_sample < 0:
        raise ValueError("nodes, gpus_per_node, max_length and micro_batch must be >= 1")
    unknown = sorted(set(freeze) - set(PARTS))
    if unknown:
        raise ValueError(f"freeze: unknown parts {unknown}; choose from {PARTS}")
    model = meta_model(config)
    for part in PARTS:  # as MMSceneModule.configure_model does
        getattr(model, _ATTR[part]).requires_grad_(part not in freeze)
    if hasattr(model, "freeze_unused"):
        model.freeze_unused()

    params: dict[str, dict[str, int]] = {}
    seen: set[int] = set()
    for part in PARTS:
        own = [p for p in _unique(getattr(model, _ATTR[part]).parameters()) if id(p) not in seen]
        seen.update(id(p) for p in own)
        params[part] = {
            "total": sum(p.numel() for p in own),
            "trainable": sum(p.numel() for p in own if p.requires_grad),
        }
    params["total"] = {k: sum(params[p][k] for p in PARTS) for k in ("total", "trainable")}
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

    acts = activations(
        model,
        freeze,
        max_length,
        micro_batch,
        images_per_sample,
        act_bytes=2 if pb == 2 else m,
    )
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
    )


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def activations(model, freeze, s: int, b: int, images_per_sample: int, act_bytes: int = 2) -> dict[str, Any]:
    text = model.config.text_config
    h, a, L, V = text.hidden_size, text.num_attention_heads, text.num_hidden_layers, text.vocab_size
    layer = layer_activation_bytes(s, b, h, a, act_bytes)
    layer_sdpa = layer_activation_bytes(s, b, h, a, act_bytes, scores=False)
    logits = s * b * V * (act_bytes + 4)
    # Backward begins with the loss's fp32 gradient and its bf16 cast while the logits are still
    # held: the peak of a step (measured on an H200 with the 0.5B config, see docs/slurm.md).
    logits_grad = s * b * V * (4 + act_bytes)
    inputs = L * s * b * h * act_bytes  # what checkpointing keeps: each layer's input
    out: dict[str, Any] = {
        "max_length": s,
        "micro_batch": b,
        "llm_layer": layer,
        "llm_layer_sdpa": layer_sdpa,
        "logits": logits,
        "logits_grad": logits_grad,
    }
    vis = model.config.vision_config
    images = b * images_per_sample
    vision_trained = "vision" not in freeze
    sv = model.tokens_per_image()
    if vision_trained and images:
        v_layer = layer_activation_bytes(sv, images, vis.hidden_size, vis.num_attention_heads, act_bytes)
        v_layer_sdpa = layer_activation_bytes(
            sv, images, vis.hidden_size, vis.num_attention_heads, act_bytes, False
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
        table["stored"] = table["llm"] + table["vision"] + logits
        table["stored_sdpa"] = table["llm_sdpa"] + table["vision_sdpa"] + logits
        table["total"] = table["stored"] + logits_grad
        table["total_sdpa"] = table["stored_sdpa"] + logits_grad
    return out


# ---------------------------------------------------------------- configs and the command
def settings_from_yaml(path: str | Path) -> dict[str, Any]:
    """What ``plan`` needs from a LightningCLI YAML: model spec, freeze, fsdp, data sizes."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    model = data.get("model") or {}
    fsdp = model.get("fsdp") or {}
    precision = str((data.get("trainer") or {}).get("precision") or "")
    d = data.get("data") or {}
    return {
        "spec": model.get("model") or {"config": {}},
        "freeze": ["vision"]
        if model.get("freeze") is None
        else list(model["freeze"]),  # MMSceneModule's default
        "param_dtype": fsdp.get("param_dtype") or ("bfloat16" if "bf16" in precision else None),
        "reduce_dtype": fsdp.get("reduce_dtype", "float32"),
        "hybrid": bool(fsdp.get("hybrid", False)),
        "activation_checkpointing": bool(model.get("activation_checkpointing", False)),
        "max_length": d.get("max_length", 4096),
        "micro_batch": d.get("batch_size", 8),
    }


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        help="LightningCLI YAML: model.model, model.freeze, model.fsdp, data.max_length/batch_size",
    )
    parser.add_argument(
        "--model",
        help="an LLM preset (qwen1.5-0.5b-chat, qwen1.5-7b-chat) or config.json path; "
        "with --config it replaces model.model (e.g. a hub checkpoint that is not on this machine)",
    )
    parser.add_argument(
        "--vision", default="siglip-so400m-patch14-384-26l", help="vision preset with --model"
    )
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument(
        "--max-length", type=int, help="tokens per sample (default: data.max_length, else 4096)"
    )
    parser.add_argument(
        "--micro-batch", type=int, help="samples per GPU and step (default: data.batch_size, else 1)"
    )
    parser.add_argument("--images-per-sample", type=int, default=1, help="for the vision tower's activations")
    parser.add_argument("--freeze", nargs="*", help="parts not trained (default: model.freeze, else vision)")
    parser.add_argument(
        "--param-dtype", help="FSDP2 compute dtype (default: model.fsdp.param_dtype, else bfloat16)"
    )
    parser.add_argument(
        "--hybrid", action="store_true", default=None, help="shard within a node, replicate across"
    )
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")


def plan_main(args: argparse.Namespace) -> int:
    from mmscene.model.config import MultimodalConfig

    if not args.config and not args.model:
        raise SystemExit("mmscene plan: give --config X.yaml, --model PRESET, or both")
    if args.config:
        s = settings_from_yaml(args.config)
    else:
        s = {
            "freeze": ["vision"],
            "param_dtype": "bfloat16",
            "reduce_dtype": "float32",
            "hybrid": False,
            "activation_checkpointing": False,
            "max_length": 4096,
            "micro_batch": 1,
        }
    if args.model:
        config = MultimodalConfig(vision=args.vision, text=args.model)
    else:
        from mmscene.train.module import model_config

        try:
            config = model_config(s["spec"])
        except Exception as err:  # noqa: BLE001 - e.g. a hub id while offline: say what to do instead
            raise SystemExit(
                f"mmscene plan: cannot read the model config of {args.config} ({type(err).__name__}: {err}); "
                "add --model PRESET (e.g. qwen1.5-7b-chat) to plan with a preset of the same size"
            ) from err
    result = plan(
        config,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        freeze=s["freeze"] if args.freeze is None else args.freeze,
        max_length=args.max_length or s["max_length"],
        micro_batch=args.micro_batch or s["micro_batch"],
        images_per_sample=args.images_per_sample,
        param_dtype=args.param_dtype or s["param_dtype"],
        reduce_dtype=s["reduce_dtype"],
        hybrid=s["hybrid"] if args.hybrid is None else args.hybrid,
        activation_checkpointing=s["activation_checkpointing"],
    )
    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=2)
        print()
    else:
        print(format_plan(result))
    return 0


def _gib(n: int) -> str:
    return f"{n / GiB:9.2f} GiB"


def format_plan(p: Plan) -> str:
    names = {1: "fp8", 2: "bf16", 4: "fp32"}
    lines = [f"mmscene plan: {p.nodes} node(s) x {p.gpus_per_node} GPU(s) = {p.world_size} GPUs"]
    lines.append("")
    lines.append(f"{'parameters':<12}{'total':>16}{'trainable':>16}")
    for part in (*PARTS, "total"):
        row = p.params[part]
        lines.append(f"{part:<12}{row['total']:>16,}{row['trainable']:>16,}")
    lines.append(f"frozen: {', '.join(p.freeze) or 'nothing'}")
    lines.append(
        f"FSDP2 units: {p.num_units} (largest {p.largest_unit:,} params) + root ({p.root_params:,} params)"
    )
    lines.append("")
    group = (
        f"{p.shard_size} GPUs of one node (hybrid: replicated across nodes)"
        if p.hybrid
        else f"{p.shard_size} GPUs"
    )
    lines.append(f"per GPU, FSDP2 sharded over {group}:")
    m, pb, rb = names[p.master_bytes], names[p.param_bytes], names[p.reduce_bytes]
    f, d = p.fsdp, p.ddp
    rows = [
        (f"{m} master parameters (P/N)", f["params"]),
        (f"{m} gradients (T/N)", f["grads"]),
        ("AdamW exp_avg + exp_avg_sq (2T/N)", f["optimizer"]),
        (f"{pb} gathered params (root + 2 layers)", f["gathered"]),
        (f"unsharded grads {pb}+{rb} (largest unit)", f["unsharded_grads"]),
        ("= without activations", f["total_without_activations"]),
    ]
    lines += [f"  {label:<42}{_gib(value)}" for label, value in rows]
    lines.append("per GPU, DDP (full replication), for comparison:")
    lines.append(f"  {'params + grads + AdamW + grad buckets':<42}{_gib(d['total_without_activations'])}")
    a = p.activations
    lines.append("")
    lines.append(
        f"activations per GPU: max_length s={a['max_length']}, micro-batch b={a['micro_batch']}, "
        f"{a['images']} image(s) x {a['vision_tokens_per_image']} tokens"
    )
    lines.append("  per decoder layer s*b*h*(34 + 5*a*s/h) bytes (Korthikanti et al. 2022, 16-bit);")
    lines.append("  SDPA/flash attention does not store the 5*a*s/h score term; logits s*b*V*(2+4) bytes,")
    lines.append("  and their gradients s*b*V*(4+2) bytes at the start of backward")
    lines.append(f"  {'':<24}{'eager attention':>16}{'SDPA / flash':>16}")
    for key, title in (("full", "no checkpointing"), ("checkpointed", "act. checkpointing")):
        t = a[key]
        mark = " <- configured" if (key == "checkpointed") == p.activation_checkpointing else ""
        lines.append(f"  {title:<24}{_gib(t['total']):>16}{_gib(t['total_sdpa']):>16}{mark}")
        lines.append(f"    {'LLM layers':<22}{_gib(t['llm']):>16}{_gib(t['llm_sdpa']):>16}")
        lines.append(f"    {'vision layers':<22}{_gib(t['vision']):>16}{_gib(t['vision_sdpa']):>16}")
    lines.append(f"    {'logits':<22}{_gib(a['logits']):>16}")
    lines.append(f"    {'logits gradients':<22}{_gib(a['logits_grad']):>16}")
    lines.append("")
    ckpt = "with" if p.activation_checkpointing else "without"
    lines.append(f"total per GPU ({ckpt} activation checkpointing, as configured):")
    lines.append(f"  {'FSDP2, SDPA attention (transformers default)':<42}{_gib(f['total_sdpa'])}")
    lines.append(f"  {'FSDP2, eager attention':<42}{_gib(f['total'])}")
    lines.append(f"  {'DDP, SDPA attention':<42}{_gib(d['total_sdpa'])}")
    lines.append("not included: CUDA context, NCCL buffers, allocator fragmentation (add ~10-20%)")
    return "\n".join(lines)
