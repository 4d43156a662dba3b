"""Training-step throughput of the 0.5B-size config under FSDP2 (fully_shard), bf16, random weights:
each throughput change switched on in turn, on the same samples (M4-Instruct-like: single images,
2-8 image sets, 16-frame videos with 2x2 frame pooling, text-only).

Rungs (each a fresh model; ``--rungs`` picks some):
  padded        batches of ``--batch`` samples padded to the longest, SDPA, loss from full logits
  packed        the same samples packed into rows of ``--max-tokens``, SDPA (dense block mask)
  +fused-loss   the loss from the last hidden states (Liger's fused kernel where installed, else chunked)
  +varlen       flash-attention varlen where flash-attn is installed, else flex attention
  +compile      torch.compile per tower / decoder block
Batches are pinned and copied with ``non_blocking``. Per rung: real tokens/s, peak memory and both
MFU counts of :mod:`mmscene.model.flops` (LM only; with the vision tower) against the device's
datasheet peak (Lightning's table).

  python bench/gpu_fsdp2_step.py                       # CUDA, 0.5B config, ~5 min on an H200
  python bench/gpu_fsdp2_step.py --device cpu --tiny   # dry run of the same code path
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import time

import torch
import torch.distributed as dist

from mmscene.data.pipeline.packing import first_fit, packed_collate
from mmscene.model.config import MultimodalConfig
from mmscene.model.core import IGNORE_INDEX, MultimodalLM
from mmscene.model.flops import FlopCounts
from mmscene.train.sharding import shard

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def make_samples(n: int, tokens_per_image: int, tokens_per_frame: int, image_token: int, seed: int = 0):
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        kind = rng.choices(["single", "multi", "video", "text"], weights=[0.4, 0.3, 0.15, 0.15])[0]
        n_img, pooled = {
            "single": (1, False),
            "multi": (rng.randint(2, 8), False),
            "video": (16, True),
            "text": (0, False),
        }[kind]
        text = rng.randint(40, 200) if kind != "text" else rng.randint(200, 900)
        per = tokens_per_frame if pooled else tokens_per_image
        ids = [rng.randrange(1000, 100000) for _ in range(text)]
        ids[:0] = [image_token] * (per * n_img)
        input_ids = torch.tensor(ids)
        labels = input_ids.clone()
        labels[: per * n_img + text // 2] = IGNORE_INDEX
        samples.append(
            {
                "input_ids": input_ids,
                "labels": labels,
                "pixel_values": torch.randn(n_img, 3, 384, 384) if n_img else torch.zeros(0, 3, 384, 384),
                "image_pooling": torch.full((n_img,), pooled, dtype=torch.bool),
                "kind": kind,
            }
        )
    return samples


def padded_batches(samples, batch: int, pad_id: int):
    from mmscene.data.pipeline.collate import pad_collate

    return [pad_collate(samples[i : i + batch], pad_id) for i in range(0, len(samples), batch)]


def packed_batches(samples, max_tokens: int, pad_id: int):
    rows = first_fit([s["input_ids"].shape[0] for s in samples], max_tokens)
    return [packed_collate(samples, pad_id, rows=[row]) for row in rows]


RUNGS = ("padded", "packed", "+fused-loss", "+varlen", "+compile")


def _to(b, device):
    """Pinned host tensors, copied without waiting (the copy overlaps the previous step's work)."""

    def move(x):
        if not isinstance(x, torch.Tensor):
            return x
        return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)

    return {k: move(v) for k, v in b.items()}


def build(config, rung: int, device, dtype, varlen: str, checkpointing: bool):
    torch.manual_seed(0)
    with torch.device(device):
        model = MultimodalLM(config, attn_implementation=varlen if rung >= RUNGS.index("+varlen") else "sdpa")
    model.vision_tower.requires_grad_(False)  # the paper's recipe: frozen tower
    if checkpointing:
        model.language_model.gradient_checkpointing_enable({"use_reentrant": False})
    if rung >= RUNGS.index("+compile"):
        model.compile_blocks()
    # the training path's own sharding: one unit per block (and untied embedding / head), bf16
    # parameters, fp32 gradient reduction
    shard(
        model,
        None,
        {"param_dtype": "bfloat16" if dtype == torch.bfloat16 else None, "reduce_dtype": "float32"},
    )
    return model


def run_rung(rung: int, model, batches, device, warmup: int, peak: float | None, counts: FlopCounts):
    fused = rung >= RUNGS.index("+fused-loss")
    # fused, as `mmscene fit` (model.optimizer_impl: auto) steps it on CPU and CUDA
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)

    def step(b):
        b = _to(b, device)
        inputs = {
            k: b.get(k)
            for k in ("input_ids", "pixel_values", "attention_mask", "position_ids", "image_pooling")
        }
        if fused:
            loss_sum, count = model(**inputs, labels=b["labels"], summed_loss={"kernel": "auto"})
            loss = loss_sum / count
        else:
            loss = model(**inputs, labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for b in batches[:warmup]:
        step(b)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timed = batches[warmup:]
    t0 = time.perf_counter()
    for b in timed:
        loss = step(b)
    sync()
    seconds = time.perf_counter() - t0
    real = sum(b["real_tokens"] for b in timed)
    computed = sum(b["input_ids"].numel() for b in timed)
    tokens_per_image = (model.tokens_per_image(), model.tokens_per_image(pooled=True))
    flops_lm = sum(counts.lm(b["sample_lengths"]) for b in timed)
    flops_vit = sum(
        counts.with_vit(
            b["sample_lengths"], b["pixel_values"].shape[0], _image_positions(b, *tokens_per_image)
        )
        for b in timed
    )
    row = {
        "rung": RUNGS[rung],
        "steps": len(timed),
        "real_tokens_per_s": real / seconds,
        "padding_efficiency": real / computed,
        "step_s": seconds / len(timed),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
        "mfu_lm": flops_lm / seconds / peak if peak else float("nan"),
        "mfu_with_vit": flops_vit / seconds / peak if peak else float("nan"),
        "last_loss": float(loss),
    }
    print(
        f"{row['rung']}: {row['real_tokens_per_s']:.0f} tokens/s, padding efficiency {row['padding_efficiency']:.3f}, "
        f"{row['step_s'] * 1e3:.0f} ms/step, peak {row['peak_mem_gib']:.1f} GiB, "
        f"MFU {row['mfu_lm']:.3f} (LM) / {row['mfu_with_vit']:.3f} (with ViT)",
        flush=True,
    )
    return row


def _image_positions(b, per_image: int, per_frame: int) -> int:
    pooled = b.get("pooled_images", 0)
    return (b["pixel_values"].shape[0] - pooled) * per_image + pooled * per_frame


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny config (dry run)")
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rungs", default=",".join(RUNGS), help=f"comma-separated subset of {RUNGS}")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    rungs = [RUNGS.index(r) for r in args.rungs.split(",")]

    device = torch.device(args.device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    if args.tiny:
        config = MultimodalConfig(
            vision="tiny-siglip", text="tiny-qwen2", image_token_id=500, frame_pool_stride=2
        )
    else:
        config = MultimodalConfig(text="qwen1.5-0.5b-chat", frame_pool_stride=2)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    has_flash = importlib.util.find_spec("flash_attn") is not None and device.type == "cuda"
    # flex attention has no CPU backward: the dry run keeps SDPA on that rung
    varlen = "flash_attention_2" if has_flash else ("flex_attention" if device.type == "cuda" else "sdpa")
    with torch.device("meta"):
        probe = MultimodalLM(config)
    probe.vision_tower.requires_grad_(False)
    counts = FlopCounts.of(probe)
    samples = make_samples(
        args.samples, probe.tokens_per_image(), probe.tokens_per_image(pooled=True), config.image_token_id
    )
    size = probe.image_size
    for s in samples:
        s["pixel_values"] = s["pixel_values"][..., :size, :size]
        if config.text_config.vocab_size < 100000:
            s["input_ids"] = torch.where(
                s["input_ids"] == config.image_token_id, s["input_ids"], s["input_ids"] % 400
            )
            s["labels"] = torch.where(s["labels"] < 0, s["labels"], s["labels"] % 400)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    from lightning.fabric.utilities.throughput import get_available_flops

    peak = get_available_flops(device, dtype) if device.type == "cuda" else None
    print(f"device: {name} (peak {peak}); varlen rung: {varlen}; samples {len(samples)}", flush=True)
    padded, packed = padded_batches(samples, args.batch, 0), packed_batches(samples, args.max_tokens, 0)
    rows = []
    for rung in rungs:
        model = build(config, rung, device, dtype, varlen, args.checkpointing)
        rows.append(run_rung(rung, model, padded if rung == 0 else packed, device, args.warmup, peak, counts))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(
        f"{'rung':<12} {'tokens/s':>10} {'pad eff':>8} {'ms/step':>8} {'peak GiB':>9} {'MFU LM':>7} {'MFU+ViT':>8}"
    )
    for r in rows:
        print(
            f"{r['rung']:<12} {r['real_tokens_per_s']:>10.0f} {r['padding_efficiency']:>8.3f} {r['step_s'] * 1e3:>8.0f} "
            f"{r['peak_mem_gib']:>9.1f} {r['mfu_lm']:>7.3f} {r['mfu_with_vit']:>8.3f}"
        )
    with open(os.path.join(args.out, "gpu_fsdp2_step.json"), "w") as f:
        json.dump({"device": name, "torch": torch.__version__, "args": vars(args), "rows": rows}, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
