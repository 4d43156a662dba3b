"""Training-step throughput of the 0.5B-size config under FSDP2 (fully_shard), bf16, random weights.

Measures, in one run on the same model and the same sample mix (M4-Instruct-like: single images,
2-8 image sets, 16-frame videos with 2x2 frame pooling, text-only):
- padded: batches of ``--batch`` samples padded to the longest;
- packed: the same samples packed into rows of ``--max-tokens`` (restarting positions).
Prints tokens/s (real tokens), padding efficiency, peak memory and MFU, one line each and a table.

  python bench/gpu_fsdp2_step.py                       # CUDA, 0.5B config
  python bench/gpu_fsdp2_step.py --device cpu --tiny   # dry run of the same code path
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch
import torch.distributed as dist

from mmscene.data.pipeline.packing import first_fit, packed_collate
from mmscene.model.config import MultimodalConfig
from mmscene.model.core import IGNORE_INDEX, MultimodalLM
from mmscene.train.sharding import shard_units

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

    out = []
    for i in range(0, len(samples), batch):
        group = samples[i : i + batch]
        b = pad_collate(group, pad_id)
        b["real_tokens"] = sum(s["input_ids"].shape[0] for s in group)
        out.append(b)
    return out


def packed_batches(samples, max_tokens: int, pad_id: int):
    rows = first_fit([s["input_ids"].shape[0] for s in samples], max_tokens)
    return [packed_collate(samples, pad_id, rows=[row]) for row in rows]


def model_flops(model: MultimodalLM, batch) -> float:
    """Useful FLOPs of one step: 6N per trained token + causal attention per sample, 2N per vision token."""
    cfg_t = model.config.text_config
    n_llm = sum(p.numel() for p in model.language_model.parameters()) + sum(
        p.numel() for p in model.projector.parameters()
    )
    n_vis = sum(p.numel() for p in model.vision_tower.parameters())
    L, d = cfg_t.num_hidden_layers, cfg_t.hidden_size
    if batch.get("position_ids") is not None:
        starts = (batch["position_ids"] == 0).nonzero().tolist()
        pos = batch["position_ids"]
        lengths = []
        for r, c in starts:
            end = c + 1
            while end < pos.shape[1] and pos[r, end] != 0:
                end += 1
            lengths.append(end - c)
    else:
        lengths = batch["attention_mask"].sum(1).tolist()
    tokens = batch["real_tokens"]
    attn = sum(6 * L * d * s * s for s in lengths)
    n_images = batch["pixel_values"].shape[0]
    vis_tokens = n_images * model.patch_grid**2
    vcfg = model.config.vision_config
    vis_attn = n_images * 4 * vcfg.num_hidden_layers * vcfg.hidden_size * model.patch_grid**4
    return 6 * n_llm * tokens + attn + 2 * n_vis * vis_tokens + vis_attn


def run_mode(name, model, optimizer, batches, device, warmup: int, peak: float | None):
    def step(b):
        out = model(
            input_ids=b["input_ids"].to(device),
            pixel_values=b["pixel_values"].to(device),
            attention_mask=None if b.get("attention_mask") is None else b["attention_mask"].to(device),
            labels=b["labels"].to(device),
            position_ids=None if b.get("position_ids") is None else b["position_ids"].to(device),
            image_pooling=b["image_pooling"].to(device),
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.detach()

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
    flops = sum(model_flops(model, b) for b in timed)
    row = {
        "mode": name,
        "steps": len(timed),
        "real_tokens_per_s": real / seconds,
        "padding_efficiency": real / computed,
        "step_s": seconds / len(timed),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
        "mfu": flops / seconds / peak if peak else float("nan"),
        "last_loss": float(loss),
    }
    print(
        f"{name}: {row['real_tokens_per_s']:.0f} tokens/s, padding efficiency {row['padding_efficiency']:.3f}, "
        f"{row['step_s'] * 1e3:.0f} ms/step, peak {row['peak_mem_gib']:.1f} GiB, MFU {row['mfu']:.3f}",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny config (dry run)")
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()

    device = torch.device(args.device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if args.tiny:
        config = MultimodalConfig(
            vision="tiny-siglip", text="tiny-qwen2", image_token_id=500, frame_pool_stride=2
        )
    else:
        config = MultimodalConfig(text="qwen1.5-0.5b-chat", frame_pool_stride=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = MultimodalLM(config, attn_implementation=args.attn)
    model.vision_tower.requires_grad_(False)  # the paper's recipe: frozen tower
    if args.checkpointing:
        model.language_model.gradient_checkpointing_enable({"use_reentrant": False})
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for unit in shard_units(model):
        fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    size = model.image_size
    samples = make_samples(
        args.samples, model.tokens_per_image(), model.tokens_per_image(pooled=True), config.image_token_id
    )
    for s in samples:
        s["pixel_values"] = s["pixel_values"][..., :size, :size]
        if config.text_config.vocab_size < 100000:
            s["input_ids"] = torch.where(
                s["input_ids"] == config.image_token_id, s["input_ids"], s["input_ids"] % 400
            )
            s["labels"] = torch.where(s["labels"] < 0, s["labels"], s["labels"] % 400)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    print(f"device: {name}; params {model.num_parameters()}; samples {len(samples)}", flush=True)
    rows = [
        run_mode(
            "padded", model, optimizer, padded_batches(samples, args.batch, 0), device, args.warmup, peak
        ),
        run_mode(
            "packed", model, optimizer, packed_batches(samples, args.max_tokens, 0), device, args.warmup, peak
        ),
    ]
    print(f"{'mode':<8} {'tokens/s':>10} {'pad eff':>8} {'ms/step':>8} {'peak GiB':>9} {'MFU':>6}")
    for r in rows:
        print(
            f"{r['mode']:<8} {r['real_tokens_per_s']:>10.0f} {r['padding_efficiency']:>8.3f} {r['step_s'] * 1e3:>8.0f} "
            f"{r['peak_mem_gib']:>9.1f} {r['mfu']:>6.3f}"
        )
    print(
        f"summary: packed/padded tokens/s = {rows[1]['real_tokens_per_s'] / rows[0]['real_tokens_per_s']:.2f}x on {name}"
    )
    with open(os.path.join(args.out, "gpu_fsdp2_step.json"), "w") as f:
        json.dump({"device": name, "torch": torch.__version__, "args": vars(args), "rows": rows}, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
