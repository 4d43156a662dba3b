"""Where a training step's time goes: mmscene's loop from shards vs a plain loop over the same
batches pre-tokenized and packed in memory, in one run.

The demo model (configs/demo.yaml's tiny SigLIP + Qwen2) trains on the demo dataset with
token-budget packing. Two loops from the same weights, one process, one thread, the loader in
the process (``num_workers: 0``: its time is on the step's critical path, as in a peer comparison
at one process):

  mmscene   shards -> plugin load (decode media) -> format -> PromptEncoder (chat template,
            tokenize) -> pack -> the training step (chunked fused loss, backward, AdamW)
  plain     the very batches mmscene produced, kept in memory as tensors (what a pre-tokenized
            dataset gives) -> the same training step

Their steps are interleaved (one of each in turn) so that load from other processes hits both
alike; wall and CPU seconds are reported, and mmscene's data time is split into its stages.

  python bench/loop_breakdown.py                 # generates 4 x 100 demo samples, ~1 min
  python bench/loop_breakdown.py --data data/demo --steps 60
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_data import add_demo_data_arguments, demo_data  # noqa: E402

from mmscene.data.pipeline.batching import TokenBudget, row_collate  # noqa: E402
from mmscene.data.pipeline.encode import ImageGeometry, PromptEncoder  # noqa: E402
from mmscene.data.pipeline.mixer import MixedBatches, Source  # noqa: E402
from mmscene.model.config import MultimodalConfig  # noqa: E402
from mmscene.model.core import MultimodalLM  # noqa: E402
from mmscene.registry import get_scenario  # noqa: E402
from mmscene.train.datamodule import load_tokenizer  # noqa: E402
from mmscene.train.inputs import core_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    """Wall and CPU seconds per named stage."""

    def __init__(self):
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    def timed(self, name: str, fn):
        def wrapper(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall[name] += time.perf_counter() - t0
                self.cpu[name] += time.process_time() - c0

        return wrapper


class TimedPlugin:
    """A scenario plugin whose ``load`` and ``format`` are clocked."""

    def __init__(self, plugin, clock: Clock):
        self._plugin = plugin
        self.load = clock.timed("load media", plugin.load)
        self.format = clock.timed("format", plugin.format)

    def __getattr__(self, name):
        return getattr(self._plugin, name)


def train_step(model, optimizer, batch) -> float:
    summed = {"kernel": "chunked", "chunk_tokens": 512, "positions": batch["label_positions"]}
    loss_sum, count = model(**core_inputs(batch), labels=batch["labels"], summed_loss=summed)
    (loss_sum / count).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss_sum.detach() / count)


def build(config: MultimodalConfig) -> tuple[MultimodalLM, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = MultimodalLM(config).train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_demo_data_arguments(parser)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--row-tokens", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data, tmp = demo_data(args)
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config = MultimodalConfig(**cfg["model"]["model"]["config"])
    tokenizer = load_tokenizer(str(data / "tokenizer"))
    clock = Clock()
    probe, _ = build(config)
    encoder = PromptEncoder(tokenizer, ImageGeometry.of(probe), max_length=cfg["data"]["max_length"])
    options = cfg["data"]["scenarios"]
    names = [s["scenario"] for s in cfg["data"]["train"]]
    plugins = {n: TimedPlugin(get_scenario(n, **options.get(n, {})), clock) for n in names}
    sources = [Source(shards=str(data / "train" / n), scenario=n) for n in names]
    budget = TokenBudget(max_tokens=args.max_tokens, row_tokens=args.row_tokens, lookahead=64)
    stream = MixedBatches(
        sources,
        plugins,
        clock.timed("encode (template + tokenize)", encoder.encode),
        clock.timed("pack (collate)", row_collate(tokenizer.pad_token_id, pack=True)),
        batch_size=1,
        tokens=budget,
    )
    batches = iter(stream)
    ours, ours_opt = build(config)
    plain, plain_opt = build(config)
    kept: list[dict] = []
    totals = {"mmscene": [0.0, 0.0], "plain": [0.0, 0.0], "data": [0.0, 0.0]}
    tokens = 0
    for step in range(args.warmup + args.steps):
        timed = step >= args.warmup
        if timed and step == args.warmup:
            clock.wall.clear(), clock.cpu.clear()
        # mmscene: fetch (decode, format, encode, pack) + step
        t0, c0 = time.perf_counter(), time.process_time()
        batch = next(batches)
        t1, c1 = time.perf_counter(), time.process_time()
        train_step(ours, ours_opt, batch)
        t2, c2 = time.perf_counter(), time.process_time()
        # plain: the same batch, already tensors in memory + the same step
        kept.append(batch)
        train_step(plain, plain_opt, kept[-1])
        t3, c3 = time.perf_counter(), time.process_time()
        if timed:
            totals["mmscene"][0] += t2 - t0
            totals["mmscene"][1] += c2 - c0
            totals["data"][0] += t1 - t0
            totals["data"][1] += c1 - c0
            totals["plain"][0] += t3 - t2
            totals["plain"][1] += c3 - c2
            tokens += batch["real_tokens"]
    del tmp
    ours_wall, ours_cpu = totals["mmscene"]
    plain_wall, plain_cpu = totals["plain"]
    print(
        f"torch {torch.__version__}, 1 thread; demo model {sum(p.numel() for p in probe.parameters()) / 1e6:.2f}M "
        f"params; {args.steps} packed steps ({args.max_tokens} tokens, rows of {args.row_tokens}), {tokens} tokens"
    )
    print(f"{'loop':<34} {'wall s':>7} {'CPU s':>7} {'tokens/s':>9} {'share':>6}")
    print(
        f"{'plain (pre-tokenized, in memory)':<34} {plain_wall:>7.2f} {plain_cpu:>7.2f} {tokens / plain_wall:>9.0f}"
    )
    print(f"{'mmscene (from shards)':<34} {ours_wall:>7.2f} {ours_cpu:>7.2f} {tokens / ours_wall:>9.0f}")
    data_wall = totals["data"][0]
    print(
        f"{'  of which data':<34} {data_wall:>7.2f} {totals['data'][1]:>7.2f} {'':>9} {data_wall / ours_wall:>6.1%}"
    )
    for name in sorted(clock.wall, key=clock.wall.get, reverse=True):
        print(
            f"{'    ' + name:<34} {clock.wall[name]:>7.2f} {clock.cpu[name]:>7.2f} {'':>9} {clock.wall[name] / ours_wall:>6.1%}"
        )
    print(
        f"summary: mmscene's loop from shards runs at {plain_wall / ours_wall:.2f}x the plain pre-tokenized loop "
        f"(CPU {plain_cpu / ours_cpu:.2f}x); its data path is {data_wall / ours_wall:.1%} of the step"
    )


if __name__ == "__main__":
    main()
