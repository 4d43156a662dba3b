"""``mmscene plan`` as a command: settings from the YAML, the model, arguments, and the table it
prints (the numbers are :mod:`mmscene.launch.plan`'s)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from mmscene.data.pipeline.batching import TokenBudget, parse_batching

GiB = 1024**3
# An "80 GB" H100 reports 81,559 MiB; the estimate leaves out the CUDA context, NCCL buffers and
# allocator fragmentation, so a total fits when it does with this much on top.
GPU_GIB = 79.6
OVERHEAD = 0.15


def _gib(n: float) -> str:
    return f"{n / GiB:9.2f} GiB"


def describe_batching(a: dict[str, Any]) -> str:
    """One line naming the micro-batch the activations are for."""
    b = a["batching"]
    n, s, rows = a["tokens"], a["row_length"], a["rows"]
    if b["mode"] == "samples":
        return f"batching: samples (data.batch_size x data.max_length): b={rows} x s={s} = {n:,} tokens per micro-batch"
    if b["pack"]:
        return (
            f"batching: token budget, packed (data.batching): max_tokens={b['max_tokens']} in {rows} row(s) "
            f"of s={s} = {n:,} tokens per micro-batch"
        )
    return (
        f"batching: token budget, not packed (data.batching): max_tokens={b['max_tokens']} = {n:,} tokens "
        f"per micro-batch, rows up to s={s} (data.max_length={a['max_length']})"
    )


def fits(total: int, gpu_gib: float) -> str:
    need = total * (1 + OVERHEAD)
    verdict = "fits" if need <= gpu_gib * GiB else "does NOT fit"
    return f"{verdict} {gpu_gib:g} GiB (x{1 + OVERHEAD:.2f} = {need / GiB:.1f})"


def format_plan(p, gpu_gib: float = GPU_GIB) -> str:
    names = {1: "fp8", 2: "bf16", 4: "fp32"}
    lines = [f"mmscene plan: {p.nodes} node(s) x {p.gpus_per_node} GPU(s) = {p.world_size} GPUs"]
    lines.append("")
    lines.append(f"{'parameters':<12}{'total':>16}{'trainable':>16}")
    for part in (*("vision", "projector", "llm"), "total"):
        row = p.params[part]
        lines.append(f"{part:<12}{row['total']:>16,}{row['trainable']:>16,}")
    lines.append(f"frozen: {', '.join(p.freeze) or 'nothing'}")
    if p.lora:
        where = "LLM and tower" if p.lora.get("tower") else "LLM"
        lines.append(f"LoRA on the {where}: r={p.lora['r']}, only adapters train there")
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
    lines.append(describe_batching(a))
    lines.append(
        f"activations per GPU: n={a['tokens']:,} tokens in rows of s={a['row_length']}, "
        f"{a['images']} image(s) x {a['vision_tokens_per_image']} tokens"
    )
    lines.append("  per decoder layer n*h*(34 + 5*a*s/h) bytes = s*b*h*(34 + 5*a*s/h) (Korthikanti et al.")
    lines.append("  2022, 16-bit); SDPA/flash attention does not store the 5*a*s/h score term; logits")
    lines.append("  s*b*V*(2+4) bytes, and their gradients s*b*V*(4+2) bytes at the start of backward")
    lines.append(f"  {'':<24}{'eager attention':>16}{'SDPA / flash':>16}")
    for key, title in (("full", "no checkpointing"), ("checkpointed", "act. checkpointing")):
        t = a[key]
        mark = " <- configured" if (key == "checkpointed") == p.activation_checkpointing else ""
        lines.append(f"  {title:<24}{_gib(t['total']):>16}{_gib(t['total_sdpa']):>16}{mark}")
        lines.append(f"    {'LLM layers':<22}{_gib(t['llm']):>16}{_gib(t['llm_sdpa']):>16}")
        lines.append(f"    {'vision layers':<22}{_gib(t['vision']):>16}{_gib(t['vision_sdpa']):>16}")
    lines.append(f"    {'attention mask':<22}{_gib(a['mask']):>16}   (rows*s*s bool; none with flash varlen)")
    lines.append(f"    {'logits':<22}{_gib(a['logits']):>16}")
    lines.append(f"    {'logits gradients':<22}{_gib(a['logits_grad']):>16}")
    lines.append("")
    ckpt = "with" if p.activation_checkpointing else "without"
    lines.append(f"total per GPU ({ckpt} activation checkpointing, as configured):")
    for label, value, strategy in (
        ("FSDP2, SDPA attention (transformers default)", f["total_sdpa"], "fsdp2"),
        ("FSDP2, eager attention", f["total"], None),
        ("DDP, SDPA attention", d["total_sdpa"], "ddp"),
    ):
        mark = "  <- configured strategy" if strategy is not None and strategy == p.strategy else ""
        lines.append(f"  {label:<42}{_gib(value)}  {fits(value, gpu_gib)}{mark}")
    lines.append(
        f"not included: CUDA context, NCCL buffers, allocator fragmentation (the x{1 + OVERHEAD:.2f} above)"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------- configs and the command
def settings_from_yaml(path: str | Path) -> dict[str, Any]:
    """What ``plan`` needs from a LightningCLI YAML: model spec, freeze, fsdp, data sizes, strategy."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    model = data.get("model") or {}
    fsdp = model.get("fsdp") or {}
    trainer = data.get("trainer") or {}
    precision = str(trainer.get("precision") or "")
    strategy = trainer.get("strategy")
    strategy = str(strategy.get("class_path", "") if isinstance(strategy, dict) else strategy or "")
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
        "loss_chunk_tokens": _loss_chunk(model),
        "lora": model.get("lora"),
        "max_length": d.get("max_length", 4096),
        "micro_batch": d.get("batch_size", 8),
        "batching": parse_batching(d.get("batching")),
        "strategy": "fsdp2"
        if strategy.endswith("ModelParallelStrategy")
        else "ddp"
        if strategy.startswith("ddp") or strategy.endswith("DDPStrategy")
        else None,
    }


DEFAULT_SETTINGS = {
    "freeze": ["vision"],
    "param_dtype": "bfloat16",
    "reduce_dtype": "float32",
    "hybrid": False,
    "activation_checkpointing": False,
    "max_length": 4096,
    "micro_batch": 1,
    "batching": None,
    "strategy": None,
    "loss_chunk_tokens": 512,
    "lora": None,
}


def _loss_chunk(model: dict) -> int | None:
    """Positions per chunk of the run's loss kernel; None for ``plain`` (logits of every position)."""
    if model.get("loss_kernel", "auto") == "plain":
        return None
    return int(model.get("loss_chunk_tokens", 512))


def resolve_model(spec: dict[str, Any] | None, preset: str | None, vision: str, source: str, instead: str):
    """The MultimodalConfig of ``--model PRESET`` (with ``vision``), else of the YAML's model spec."""
    from mmscene.model.config import MultimodalConfig

    if preset:
        return MultimodalConfig(vision=vision, text=preset)
    from mmscene.train.module import model_config

    try:
        return model_config(spec or {"config": {}})
    except Exception as err:  # noqa: BLE001 - e.g. a hub id while offline: say what to do instead
        raise SystemExit(
            f"mmscene: cannot read the model config of {source} ({type(err).__name__}: {err}); "
            f"add --model PRESET (e.g. qwen1.5-7b-chat) {instead}"
        ) from err


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="an LLM preset (qwen1.5-0.5b-chat, qwen1.5-7b-chat) or config.json path; "
        "with --config it replaces model.model (e.g. a hub checkpoint that is not on this machine)",
    )
    parser.add_argument(
        "--vision", default="siglip-so400m-patch14-384-26l", help="vision preset with --model"
    )


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        help="LightningCLI YAML: model.model, model.freeze, model.fsdp, data.max_length/batch_size/batching",
    )
    add_model_arguments(parser)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument(
        "--max-length", type=int, help="tokens per sample (default: data.max_length, else 4096)"
    )
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument(
        "--micro-batch",
        type=int,
        help="samples per GPU and step, padded to --max-length (default: data.batch_size, else 1)",
    )
    batch.add_argument(
        "--max-tokens",
        type=int,
        help="token budget per GPU and step (data.batching mode tokens; packed unless the YAML says pack: false)",
    )
    parser.add_argument("--images-per-sample", type=int, default=1, help="for the vision tower's activations")
    parser.add_argument("--freeze", nargs="*", help="parts not trained (default: model.freeze, else vision)")
    parser.add_argument(
        "--param-dtype", help="FSDP2 compute dtype (default: model.fsdp.param_dtype, else bfloat16)"
    )
    parser.add_argument(
        "--hybrid", action="store_true", default=None, help="shard within a node, replicate across"
    )
    parser.add_argument(
        "--gpu-gib",
        type=float,
        default=GPU_GIB,
        help=f"GPU memory to check the totals against, GiB (default {GPU_GIB}: an 80 GB H100)",
    )
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")


def _batching(args: argparse.Namespace, s: dict[str, Any]) -> TokenBudget | None:
    if args.micro_batch:
        return None
    budget = s["batching"]
    if not args.max_tokens:
        return budget
    pack = budget.pack if budget else True
    rows = (
        budget.row_tokens if budget and budget.row_tokens and budget.row_tokens <= args.max_tokens else None
    )
    return TokenBudget(max_tokens=args.max_tokens, pack=pack, row_tokens=rows)


def plan_main(args: argparse.Namespace) -> int:
    if not args.config and not args.model:
        raise SystemExit("mmscene plan: give --config X.yaml, --model PRESET, or both")
    s = settings_from_yaml(args.config) if args.config else dict(DEFAULT_SETTINGS)
    config = resolve_model(
        s.get("spec"), args.model, args.vision, str(args.config), "to plan with a preset of the same size"
    )
    max_length = args.max_length or s["max_length"]
    budget = _batching(args, s)
    if budget is not None and max_length > budget.row_capacity:
        print(
            f"mmscene plan: warning: max_length {max_length} exceeds the row capacity {budget.row_capacity} "
            "of the token budget; the data module refuses this config",
            file=sys.stderr,
        )
    from mmscene.launch.plan import plan

    result = plan(
        config,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        freeze=s["freeze"] if args.freeze is None else args.freeze,
        max_length=max_length,
        micro_batch=args.micro_batch or s["micro_batch"],
        batching=budget,
        images_per_sample=args.images_per_sample,
        param_dtype=args.param_dtype or s["param_dtype"],
        reduce_dtype=s["reduce_dtype"],
        hybrid=s["hybrid"] if args.hybrid is None else args.hybrid,
        activation_checkpointing=s["activation_checkpointing"],
        strategy=s["strategy"],
        loss_chunk_tokens=s["loss_chunk_tokens"],
        lora=s["lora"],
    )
    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=2)
        print()
    else:
        print(format_plan(result, gpu_gib=args.gpu_gib))
    return 0
