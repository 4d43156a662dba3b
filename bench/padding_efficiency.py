"""Padding efficiency of batching strategies on an M4-Instruct-like length mix (no model, lengths only).

Synthetic lengths, drawn i.i.d. in arrival order (seeded) — the same mix as bench/gpu_fsdp2_step.py:
  single image  p=0.40  1 image x 729 tokens + text U{40..200}
  multi-image   p=0.30  U{2..8} images x 729 + text U{40..200}
  video         p=0.15  16 frames x 169 (2x2-pooled) or x 729 (--frame-tokens) + text U{40..200}
  text-only     p=0.15  text U{200..900}

Strategies (all in arrival order):
  pad B=n          n consecutive samples per batch, padded to the longest
  budget           mmscene token budget without packing: one sample per row, similar lengths grouped
                   from a lookahead buffer, rows x longest <= max_tokens
  first-fit        packing, plain first fit over the whole set into rows of --row-tokens, one row
                   per batch (unbounded lookback: an offline upper reference)
  packed           mmscene token budget with packing: first-fit-decreasing from the lookahead buffer
                   into rows of --row-tokens, max_tokens // row_tokens rows per batch

Columns: efficiency = real tokens / computed tokens (rows x width of the collated tensors, what the
linear layers compute); row fill = real / (rows x row budget) for budgeted strategies; attn = attention
work with a dense (block-)causal mask over rows / the per-sample work sum(len^2) (what SDPA with an
explicit mask computes; flash-attention varlen would compute 1.0).

  python bench/padding_efficiency.py                  # pooled frames (169), 20000 samples
  python bench/padding_efficiency.py --frame-tokens 729
"""

from __future__ import annotations

import argparse
import json
import os
import random

from mmscene.data.pipeline.batching import TokenBudget, plan_batches
from mmscene.data.pipeline.packing import first_fit

KINDS = ("single", "multi", "video", "text")
WEIGHTS = (0.40, 0.30, 0.15, 0.15)


def m4_mix(
    n: int,
    image_tokens: int = 729,
    frame_tokens: int = 169,
    frames: int = 16,
    text_scale: float = 1.0,
    seed: int = 0,
) -> list[tuple[str, int, int]]:
    """``(kind, n_images, text_tokens)`` per sample; a sample's length is n_images x per-image + text.

    ``text_scale`` shrinks text lengths with the image tokens so that a tiny model keeps the mix's proportions.
    """
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> int:
        return max(1, round(rng.randint(lo, hi) * text_scale))

    out = []
    for _ in range(n):
        kind = rng.choices(KINDS, weights=WEIGHTS)[0]
        if kind == "single":
            out.append((kind, 1, text(40, 200)))
        elif kind == "multi":
            out.append((kind, rng.randint(2, 8), text(40, 200)))
        elif kind == "video":
            out.append((kind, frames, text(40, 200)))
        else:
            out.append((kind, 0, text(200, 900)))
    return out


def lengths_of(mix, image_tokens: int, frame_tokens: int) -> list[int]:
    return [k * (frame_tokens if kind == "video" else image_tokens) + t for kind, k, t in mix]


def measure(
    name: str, lengths: list[int], batches: list[list[list[int]]], packed: bool, row_budget: int | None
):
    """Batches are rows of sample indices; padded strategies have one sample per row."""
    real = computed = attn = 0
    rows_total = 0
    for rows in batches:
        row_lengths = [sum(lengths[i] for i in row) for row in rows]
        width = max(row_lengths)
        real += sum(row_lengths)
        computed += len(rows) * width
        rows_total += len(rows)
        # Dense mask: every row computes width^2 scores (padding included), packed or not.
        attn += len(rows) * width * width
    needed = sum(n * n for n in lengths)
    return {
        "strategy": name,
        "batches": len(batches),
        "samples_per_batch": len(lengths) / len(batches),
        "efficiency": real / computed,
        "row_fill": real / (rows_total * row_budget) if row_budget else None,
        "attention_vs_needed": attn / needed,
        "packed": packed,
    }


def run(lengths: list[int], batch_sizes: list[int], max_tokens: int, row_tokens: int, lookahead: int):
    results = []
    for b in batch_sizes:
        batches = [[[i] for i in range(s, min(s + b, len(lengths)))] for s in range(0, len(lengths), b)]
        results.append(measure(f"pad B={b}", lengths, batches, False, None))
    budget = TokenBudget(max_tokens=max_tokens, lookahead=lookahead, pack=False)
    results.append(
        measure(
            f"budget {max_tokens} (no packing, lookahead {lookahead})",
            lengths,
            plan_batches(budget, lengths),
            False,
            None,
        )
    )
    rows = first_fit(lengths, row_tokens)
    results.append(
        measure(f"first-fit rows of {row_tokens} (offline)", lengths, [[r] for r in rows], True, row_tokens)
    )
    for rows_per_batch in (1, 2):
        budget = TokenBudget(
            max_tokens=row_tokens * rows_per_batch, lookahead=lookahead, row_tokens=row_tokens
        )
        name = f"packed {rows_per_batch}x{row_tokens} (lookahead {lookahead})"
        results.append(measure(name, lengths, plan_batches(budget, lengths), True, row_tokens))
    return results


def table(results) -> str:
    lines = [
        f"{'strategy':<44} {'batches':>7} {'samples/b':>9} {'efficiency':>10} {'row fill':>8} {'attn/needed':>11}"
    ]
    for r in results:
        fill = f"{r['row_fill']:.3f}" if r["row_fill"] is not None else "-"
        lines.append(
            f"{r['strategy']:<44} {r['batches']:>7} {r['samples_per_batch']:>9.1f} {r['efficiency']:>10.3f} "
            f"{fill:>8} {r['attention_vs_needed']:>11.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument(
        "--frame-tokens", type=int, default=169, help="tokens per video frame (169 pooled, 729 full)"
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[4, 8])
    parser.add_argument(
        "--max-tokens", type=int, default=16384, help="token budget per batch without packing"
    )
    parser.add_argument("--row-tokens", type=int, default=16384, help="row length when packing")
    parser.add_argument("--lookahead", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    mix = m4_mix(args.samples, frame_tokens=args.frame_tokens, seed=args.seed)
    lengths = lengths_of(mix, 729, args.frame_tokens)
    longest = max(lengths)
    if longest > min(args.max_tokens, args.row_tokens):
        parser.error(f"the longest sample has {longest} tokens; raise --max-tokens/--row-tokens")
    results = run(lengths, args.batch, args.max_tokens, args.row_tokens, args.lookahead)
    mean = sum(lengths) / len(lengths)
    print(
        f"{args.samples} samples, {args.frame_tokens} tokens/frame, mean {mean:.0f} / max {longest} tokens, "
        f"seed {args.seed}"
    )
    print(table(results))
    pad = results[0]
    packed = next(r for r in results if r["strategy"].startswith("packed 1x"))
    budget = next(r for r in results if r["strategy"].startswith("budget"))
    met = "met" if packed["efficiency"] >= 0.95 and packed["row_fill"] >= 0.95 else "NOT met"
    print(
        f"summary: padding efficiency {pad['strategy']} {pad['efficiency']:.3f}, token budget {budget['efficiency']:.3f}, "
        f"packed {packed['efficiency']:.3f} (rows {packed['row_fill']:.1%} full); target packed >= 0.95 {met}"
    )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
