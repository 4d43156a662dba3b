"""CPU training throughput: mmscene's step vs a plain transformers Llava loop, same weights and samples.

One tiny Llava (SigLIP + Qwen2) is built, saved with ``save_pretrained`` and loaded twice: as
transformers' ``LlavaForConditionalGeneration`` and as ``MultimodalLM.from_pretrained``. Each mode
starts from those weights with a fresh AdamW and runs forward + backward + optimizer step over the
same samples (an M4-Instruct-like mix scaled to the tiny image size, real photos from
``skimage.data`` as pixels, vision tower frozen as in the paper's recipe):

  plain padded     transformers Llava, batches of --batch samples in arrival order, padded to the longest
  mmscene padded   MultimodalLM on exactly those batches (framework overhead; target within 5%)
  mmscene packed   MultimodalLM on token-budget batches packed by mmscene.data.pipeline.batching (target >= 1.3x plain)

Tokens/s counts real tokens (text + image positions, no padding) over the summed wall time of a mode's
steps. The modes' steps are interleaved (always stepping the mode least far through its batches) so
that load from other processes on a shared machine hits all modes alike; CPU seconds are shown too.
Videos use full (unpooled) frames because transformers' Llava has no frame pooling.

  python bench/train_throughput.py    # about 2 minutes (single thread, measured on a loaded 2-core machine)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from padding_efficiency import m4_mix  # noqa: E402

from mmscene.data.media.preprocess import preprocess_images  # noqa: E402
from mmscene.data.pipeline.batching import TokenBudget, collate_rows, plan_batches  # noqa: E402
from mmscene.data.pipeline.collate import pad_collate  # noqa: E402
from mmscene.model import load_pretrained
from mmscene.model.core import IGNORE_INDEX  # noqa: E402

PAD, IMAGE_TOKEN = 0, 3


def build_llava(args) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    grid = args.image_size // args.patch
    config = LlavaConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=args.vision_hidden,
            intermediate_size=4 * args.vision_hidden,
            num_hidden_layers=args.vision_layers,
            num_attention_heads=4,
            image_size=args.image_size,
            patch_size=args.patch,
            vision_use_head=False,
        ),
        text_config=Qwen2Config(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=4 * args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=max(1, args.hidden // 64),
            num_key_value_heads=max(1, args.hidden // 64),
            max_position_embeddings=8192,
            tie_word_embeddings=False,
        ),
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_seq_length=grid * grid,
        tie_word_embeddings=False,
    )
    return LlavaForConditionalGeneration(config)


def photos(size: int) -> torch.Tensor:
    """Real photographs (skimage.data) preprocessed like mmscene does; random pixels if unavailable."""
    try:
        import skimage.data as data
        from PIL import Image
    except ImportError:
        return torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(0))
    names = (
        "astronaut",
        "coffee",
        "chelsea",
        "rocket",
        "camera",
        "coins",
        "hubble_deep_field",
        "immunohistochemistry",
    )
    images = [Image.fromarray(getattr(data, n)()).convert("RGB") for n in names]
    return preprocess_images(images, size)


def make_samples(n: int, tokens_per_image: int, pixels: torch.Tensor, vocab: int, seed: int = 0):
    """The M4-like mix with text scaled like the image tokens (tokens_per_image / 729)."""
    rng = random.Random(seed)
    samples = []
    for kind, n_img, n_text in m4_mix(n, text_scale=tokens_per_image / 729, seed=seed):
        text = torch.tensor([rng.randrange(10, vocab) for _ in range(n_text)])
        ids = torch.cat([torch.full((n_img * tokens_per_image,), IMAGE_TOKEN), text])
        labels = ids.clone()
        labels[: n_img * tokens_per_image + n_text // 2] = IGNORE_INDEX  # the answer half of the text trains
        picks = [rng.randrange(len(pixels)) for _ in range(n_img)]
        samples.append(
            {
                "input_ids": ids,
                "labels": labels,
                "pixel_values": pixels[picks] if n_img else torch.zeros(0, *pixels.shape[1:]),
                "image_pooling": torch.zeros(n_img, dtype=torch.bool),
                "kind": kind,
            }
        )
    return samples


def padded(samples, batch: int):
    return [pad_collate(samples[i : i + batch], PAD) for i in range(0, len(samples), batch)]


def packed(samples, budget: TokenBudget):
    lengths = [len(s["input_ids"]) for s in samples]
    out = []
    for rows in plan_batches(budget, lengths):
        taken = sorted({i for row in rows for i in row})
        local = {i: k for k, i in enumerate(taken)}
        out.append(
            collate_rows([samples[i] for i in taken], [[local[i] for i in row] for row in rows], PAD, True)
        )
    return out


def plain_step(model, b):
    return model(
        input_ids=b["input_ids"],
        pixel_values=b["pixel_values"],
        attention_mask=b["attention_mask"],
        labels=b["labels"],
    ).loss


def mmscene_step(model, b):
    """The training step's loss as MMSceneModule computes it: summed over labelled tokens by the
    chunked fused kernel (no full logits), divided by their count."""
    loss_sum, count = model(
        input_ids=b["input_ids"],
        pixel_values=b["pixel_values"],
        attention_mask=b.get("attention_mask"),
        labels=b["labels"],
        position_ids=b.get("position_ids"),
        image_pooling=b["image_pooling"],
        summed_loss={"kernel": "chunked", "chunk_tokens": 512},
        host={"sample_starts": b["sample_starts"]} if "sample_starts" in b else None,
    )
    return loss_sum / count


def load(kind: str, path: str, attention: str = "sdpa"):
    if kind == "plain":
        model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation=attention)
        vision = model.model.vision_tower
    else:
        model = load_pretrained(path, attn_implementation=attention)
        vision = model.vision_tower
    vision.requires_grad_(False)  # the paper's recipe: frozen tower (both sides)
    return model.train()


class Runner:
    """One mode: its own model (fresh from the checkpoint), optimizer and batches, stepped on demand."""

    def __init__(
        self,
        name: str,
        kind: str,
        path: str,
        batches,
        lr: float,
        attention: str = "sdpa",
        backward: bool = True,
    ):
        self.name, self.batches, self.backward = name, batches, backward
        self.model = load(kind, path, attention)
        self.step_fn = plain_step if kind == "plain" else mmscene_step
        params = [p for p in self.model.parameters() if p.requires_grad]
        # fused: one kernel per step instead of ~10 per tensor, so the optimizer does not favour fewer steps
        self.optimizer = torch.optim.AdamW(params, lr=lr, fused=True)
        self.done, self.wall, self.cpu, self.losses = 0, 0.0, 0.0, []

    def train(self, b) -> float:
        if not self.backward:  # forward only
            with torch.no_grad():
                return float(self.step_fn(self.model, b))
        loss = self.step_fn(self.model, b)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def step(self) -> None:
        b = self.batches[self.done]
        t0, c0 = time.perf_counter(), time.process_time()
        self.losses.append(self.train(b))
        self.wall += time.perf_counter() - t0
        self.cpu += time.process_time() - c0
        self.done += 1

    @property
    def progress(self) -> float:
        return self.done / len(self.batches)

    def result(self) -> dict:
        real = sum(_real_tokens(b) for b in self.batches)
        computed = sum(b["input_ids"].numel() for b in self.batches)
        return {
            "mode": self.name,
            "steps": len(self.batches),
            "seconds": self.wall,
            "cpu_seconds": self.cpu,
            "tokens_per_s": real / self.wall,
            "tokens_per_cpu_s": real / self.cpu,
            "padding_efficiency": real / computed,
            "mean_loss": sum(self.losses) / len(self.losses),
        }


def run_interleaved(runners: list[Runner], warmup: int) -> list[dict]:
    """Step the modes in turns, always the one least far through its batches.

    Every mode's steps are spread over the same stretch of wall time, so load from other processes
    on a shared machine slows all modes alike instead of whichever ran at the wrong moment.
    """
    for r in runners:
        for b in r.batches[:warmup]:  # allocator and kernel warm-up; not timed, not counted
            r.train(b)
    while True:
        pending = [r for r in runners if r.done < len(r.batches)]
        if not pending:
            return [r.result() for r in runners]
        min(pending, key=lambda r: r.progress).step()


def _real_tokens(b) -> int:
    if b.get("real_tokens") is not None:
        return int(b["real_tokens"])
    return int(b["attention_mask"].sum())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=1024, help="token budget per packed batch")
    parser.add_argument("--row-tokens", type=int, default=512, help="packed row length")
    parser.add_argument("--lookahead", type=int, default=64)
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads (1: least skewed by other load)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--vision-hidden", type=int, default=192)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--patch", type=int, default=14)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--attention", default="sdpa,flex", help="packed kernels to compare: sdpa (dense block mask), flex"
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        build_llava(args).save_pretrained(tmp)
        probe = load_pretrained(tmp)
        tpi = probe.tokens_per_image()
        samples = make_samples(args.samples, tpi, photos(probe.image_size), args.vocab)
        pad_batches = padded(samples, args.batch)
        budget = TokenBudget(max_tokens=args.max_tokens, lookahead=args.lookahead, row_tokens=args.row_tokens)
        pack_batches = packed(samples, budget)

        # Same weights on both sides: identical loss on the first batch before any step.
        with torch.no_grad():
            plain_loss = float(plain_step(load("plain", tmp).eval(), pad_batches[0]))
            ours_loss = float(mmscene_step(probe.eval(), pad_batches[0]))
        if abs(plain_loss - ours_loss) > 1e-4:
            raise SystemExit(f"weights differ: plain loss {plain_loss:.6f} vs mmscene {ours_loss:.6f}")
        lengths = [len(s["input_ids"]) for s in samples]
        params = sum(p.numel() for p in probe.parameters())
        print(
            f"torch {torch.__version__}, {args.threads} threads; {params / 1e6:.1f}M params "
            f"(LLM hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}; SigLIP {args.vision_hidden} x "
            f"{args.vision_layers}, {args.image_size}px/{args.patch} -> {tpi} tokens per image); "
            f"{len(samples)} samples, {sum(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)}); "
            f"first-batch loss plain {plain_loss:.5f} = mmscene {ours_loss:.5f}",
            flush=True,
        )
        shape = f"{args.max_tokens // args.row_tokens}x{args.row_tokens}"
        modes = [
            ("plain padded", "plain", pad_batches, "sdpa"),
            ("mmscene padded", "mmscene", pad_batches, "sdpa"),
            (f"mmscene packed {shape} sdpa", "mmscene", pack_batches, "sdpa"),
            (f"mmscene packed {shape} varlen", "mmscene", pack_batches, "sdpa_varlen"),
        ]
        runners = [Runner(name, kind, tmp, batches, args.lr, attn) for name, kind, batches, attn in modes]
        rows = run_interleaved(runners, args.warmup)
        forward_rows = []
        if "flex" in args.attention:
            # torch's flex attention has no CPU backward (NotImplementedError): on CPU the kernels
            # are compared on the forward, which both run; training steps with flex need a GPU
            # (bench/gpu_fsdp2_step.py).
            passes = [
                ("forward: mmscene padded", pad_batches, "sdpa"),
                (f"forward: packed {shape} sdpa", pack_batches, "sdpa"),
                (f"forward: packed {shape} flex", pack_batches, "flex_attention"),
            ]
            runners = [
                Runner(name, "mmscene", tmp, batches, args.lr, attn, backward=False)
                for name, batches, attn in passes
            ]
            forward_rows = run_interleaved(runners, args.warmup)
    plain, ours, pack, varlen = rows
    print(
        f"{'mode':<26} {'steps':>5} {'wall s':>7} {'tokens/s':>9} {'CPU s':>7} {'tok/CPU-s':>9} {'pad eff':>8} "
        f"{'vs plain':>8} {'mean loss':>9}"
    )
    for r in rows:
        print(
            f"{r['mode']:<26} {r['steps']:>5} {r['seconds']:>7.1f} {r['tokens_per_s']:>9.0f} {r['cpu_seconds']:>7.1f} "
            f"{r['tokens_per_cpu_s']:>9.0f} {r['padding_efficiency']:>8.3f} "
            f"{r['tokens_per_s'] / plain['tokens_per_s']:>7.2f}x {r['mean_loss']:>9.3f}"
        )
    speedup = pack["tokens_per_s"] / plain["tokens_per_s"]
    overhead = plain["tokens_per_s"] / ours["tokens_per_s"] - 1
    print(
        f"summary: mmscene packed {speedup:.2f}x plain padded (target >= 1.3x {'met' if speedup >= 1.3 else 'NOT met'}); "
        f"mmscene padded vs plain padded {overhead:+.1%} time (target at most +5% "
        f"{'met' if overhead <= 0.05 else 'NOT met'}); CPU, {args.threads} threads"
    )
    print(
        f"summary (varlen): packed with sdpa_varlen (SDPA per sample) {varlen['tokens_per_s'] / pack['tokens_per_s']:.2f}x "
        f"packed SDPA with its dense block mask, {varlen['tokens_per_s'] / plain['tokens_per_s']:.2f}x plain padded "
        f"(CPU time {varlen['tokens_per_cpu_s'] / pack['tokens_per_cpu_s']:.2f}x / "
        f"{varlen['tokens_per_cpu_s'] / plain['tokens_per_cpu_s']:.2f}x)"
    )
    if forward_rows:
        padded_fw, sdpa_fw, flex_fw = forward_rows
        for r in forward_rows:
            print(
                f"{r['mode']:<26} {r['steps']:>5} {r['seconds']:>7.1f} {r['tokens_per_s']:>9.0f} {r['cpu_seconds']:>7.1f} "
                f"{r['tokens_per_cpu_s']:>9.0f} {r['padding_efficiency']:>8.3f} "
                f"{r['tokens_per_s'] / padded_fw['tokens_per_s']:>7.2f}x"
            )
        print(
            f"summary (forward): packed flex attention (block-causal document mask, blocks between samples "
            f"skipped) {flex_fw['tokens_per_s'] / sdpa_fw['tokens_per_s']:.2f}x packed SDPA with its dense block "
            f"mask, {flex_fw['tokens_per_s'] / padded_fw['tokens_per_s']:.2f}x padded (wall; "
            f"{flex_fw['tokens_per_cpu_s'] / sdpa_fw['tokens_per_cpu_s']:.2f}x / "
            f"{flex_fw['tokens_per_cpu_s'] / padded_fw['tokens_per_cpu_s']:.2f}x in CPU time)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"args": vars(args), "torch": torch.__version__, "rows": rows + forward_rows}, f, indent=2
            )


if __name__ == "__main__":
    main()
