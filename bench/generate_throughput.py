"""CPU generation throughput: ``MultimodalLM.generate`` vs transformers ``LlavaForConditionalGeneration.generate``.

Same weights (one tiny Llava saved with ``save_pretrained``, loaded by both), same prompts: the
M4-like mix of bench/train_throughput.py without the answers (single images, image sets, 16-frame
videos, text-only; real photos as pixels). Greedy decoding with ``min_new_tokens = max_new_tokens``
so that both generate exactly the same number of tokens; batch 1 (one prompt per call) and batch 4
(left-padded). Calls alternate between the two implementations prompt by prompt; every call runs
--rounds times and its fastest time counts (wall clock; CPU time of the process beside it). The
generated tokens are compared too.

  python bench/generate_throughput.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import IMAGE_TOKEN, PAD, build_llava, make_samples, photos  # noqa: E402

from mmscene.data.pipeline.collate import pad_collate  # noqa: E402
from mmscene.model import load_pretrained

EOS = 1


def prompts_of(samples):
    """Each sample cut before its answer half: the images and the first half of the text."""
    out = []
    for s in samples:
        n_text = int((s["input_ids"] != IMAGE_TOKEN).sum())
        keep = len(s["input_ids"]) - n_text + max(1, n_text // 2)
        prompt = {k: v for k, v in s.items() if k != "labels"}
        out.append({**prompt, "input_ids": s["input_ids"][:keep]})
    return out


def generate(kind: str, model, batch, new_tokens: int) -> torch.Tensor:
    options = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    if kind == "plain":
        if batch["pixel_values"].shape[0]:
            options["pixel_values"] = batch["pixel_values"]
        # (text-only: no pixel_values key at all; transformers 5.24 fails on pixel_values=None)
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **options)
        return out[:, batch["input_ids"].shape[1] :]  # transformers returns prompt + new tokens
    return model.generate(
        input_ids=batch["input_ids"],
        pixel_values=batch["pixel_values"],
        attention_mask=batch["attention_mask"],
        image_pooling=batch["image_pooling"],
        **options,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads (1: least skewed by other load)"
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--vision-hidden", type=int, default=192)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--patch", type=int, default=14)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        build_llava(args).save_pretrained(tmp)
        models = {
            "plain": LlavaForConditionalGeneration.from_pretrained(tmp).eval(),
            "mmscene": load_pretrained(tmp).eval(),
        }
    tpi = models["mmscene"].tokens_per_image()
    samples = make_samples(args.prompts, tpi, photos(args.image_size), args.vocab, seed=1)
    prompts = prompts_of(samples)
    settings = {
        1: [pad_collate([p], PAD, left=True) for p in prompts],
        4: [pad_collate(prompts[i : i + 4], PAD, left=True) for i in range(0, len(prompts), 4)],
    }
    lengths = [len(p["input_ids"]) for p in prompts]
    print(
        f"torch {torch.__version__}, {args.threads} threads; {len(prompts)} prompts of {min(lengths)}-{max(lengths)} "
        f"tokens ({sum(int((p['input_ids'] == IMAGE_TOKEN).sum()) // tpi for p in prompts)} images); "
        f"greedy, {args.new_tokens} new tokens each",
        flush=True,
    )
    for kind, model in models.items():  # warm-up, untimed
        generate(kind, model, settings[4][0], 4)
    rows = []
    for batch_size, batches in settings.items():
        # Per call, the fastest of --rounds timings: the least disturbed by other load (as timeit does).
        best = {kind: [float("inf")] * len(batches) for kind in models}
        cpu = {kind: [float("inf")] * len(batches) for kind in models}
        tokens = {kind: 0 for kind in models}
        same = total = 0
        for r in range(args.rounds):
            for i, batch in enumerate(batches):
                outs = {}
                order = ("plain", "mmscene") if (r + i) % 2 == 0 else ("mmscene", "plain")
                for kind in order:
                    t0, c0 = time.perf_counter(), time.process_time()
                    with torch.no_grad():
                        outs[kind] = generate(kind, models[kind], batch, args.new_tokens)
                    best[kind][i] = min(best[kind][i], time.perf_counter() - t0)
                    cpu[kind][i] = min(cpu[kind][i], time.process_time() - c0)
                    if r == 0:
                        tokens[kind] += outs[kind].numel()
                if r == 0:
                    same += int((outs["plain"] == outs["mmscene"]).all(dim=1).sum())
                    total += outs["plain"].shape[0]
        if tokens["plain"] != tokens["mmscene"]:
            raise SystemExit(f"generated token counts differ: {tokens}")
        for kind in ("plain", "mmscene"):
            rows.append(
                {
                    "impl": kind,
                    "batch": batch_size,
                    "calls": len(batches),
                    "new_tokens": tokens[kind],
                    "seconds": sum(best[kind]),
                    "cpu_seconds": sum(cpu[kind]),
                    "tokens_per_s": tokens[kind] / sum(best[kind]),
                    "tokens_per_cpu_s": tokens[kind] / sum(cpu[kind]),
                    "identical_outputs": f"{same}/{total}",
                }
            )
    print(
        f"{'implementation':<28} {'batch':>5} {'calls':>5} {'tokens':>6} {'wall s':>7} {'tokens/s':>9} {'ratio':>6} "
        f"{'tok/CPU-s':>9} {'ratio':>6} {'same':>5}"
    )
    names = {"plain": "transformers Llava.generate", "mmscene": "MultimodalLM.generate"}
    ratios = {}
    for row in rows:
        base = next(r for r in rows if r["batch"] == row["batch"] and r["impl"] == "plain")
        ratio = row["tokens_per_s"] / base["tokens_per_s"]
        cpu_ratio = row["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]
        if row["impl"] == "mmscene":
            ratios[row["batch"]] = ratio
        print(
            f"{names[row['impl']]:<28} {row['batch']:>5} {row['calls']:>5} {row['new_tokens']:>6} {row['seconds']:>7.2f} "
            f"{row['tokens_per_s']:>9.0f} {ratio:>5.2f}x {row['tokens_per_cpu_s']:>9.0f} {cpu_ratio:>5.2f}x "
            f"{row['identical_outputs']:>5}"
        )
    met = "met" if min(ratios.values()) >= 1.0 else "NOT met"
    print(
        "summary: MultimodalLM.generate / Llava.generate tokens/s = "
        + ", ".join(f"{v:.3f}x at batch {k}" for k, v in ratios.items())
        + f" (target >= 1.0x {met}); CPU, {args.threads} threads"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
