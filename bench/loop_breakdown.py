"""Where a training step's time goes: mmscene's loop from shards, from pre-tokenized shards, and a
plain loop over the same batches packed in memory, in one run.

The demo model (configs/demo.yaml's tiny SigLIP + Qwen2) trains on the demo dataset with
token-budget packing. Three loops from the same weights, one process, one thread, the loader in
the process (``num_workers: 0``: its time is on the step's critical path, as in a peer comparison
at one process):

  mmscene   shards -> plugin load (decode media) -> format -> PromptEncoder (chat template,
            tokenize) -> pack -> the training step (chunked fused loss, backward, AdamW)
  stored    the same shards after ``mmscene data tokenize``: decode media -> format -> ids read
            from the shard -> pack -> the same step (the batches must equal mmscene's)
  plain     the very batches mmscene produced, kept in memory as tensors (what a pre-tokenized
            dataset gives) -> the same training step

Their steps are interleaved (one of each in turn) so that load from other processes hits both
alike; wall and CPU seconds are reported, and each mmscene loop's data time is split into stages.

  python bench/loop_breakdown.py                 # generates 4 x 100 demo samples, ~1 min
  python bench/loop_breakdown.py --data data/demo --steps 60
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_data import add_demo_data_arguments, demo_data  # noqa: E402

from mmscene.data.pipeline.batching import TokenBudget, row_collate  # noqa: E402
from mmscene.data.pipeline.chat_template import DEFAULT_SYSTEM_PROMPT  # noqa: E402
from mmscene.data.pipeline.encode import (  # noqa: E402
    ImageGeometry,
    PromptEncoder,
    load_tokenizer,
)
from mmscene.data.pipeline.mixer import MixedBatches, Source  # noqa: E402
from mmscene.data.pipeline.stream import expand_shards  # noqa: E402
from mmscene.data.tools.pretokenize import TokenizeSpec, tokenize_folders  # noqa: E402
from mmscene.model.config import MultimodalConfig  # noqa: E402
from mmscene.model.core import MultimodalLM  # noqa: E402
from mmscene.registry import get_scenario  # noqa: E402
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
    probe, _ = build(config)
    options = cfg["data"]["scenarios"]
    names = [s["scenario"] for s in cfg["data"]["train"]]
    # the same shards with their pre-tokenized form (mmscene data tokenize --config configs/demo.yaml)
    stored_root = Path(tempfile.mkdtemp(prefix="mmscene-pretok-"))
    shutil.copytree(data / "train", stored_root / "train")
    spec = TokenizeSpec(
        str(data / "tokenizer"), cfg["data"].get("system_prompt", DEFAULT_SYSTEM_PROMPT), options
    )
    tokenize_folders([(expand_shards(str(stored_root / "train" / n)), n) for n in names], spec)
    budget = TokenBudget(max_tokens=args.max_tokens, row_tokens=args.row_tokens, lookahead=64)

    def stream(root: Path, clock: Clock):
        encoder = PromptEncoder(tokenizer, ImageGeometry.of(probe), max_length=cfg["data"]["max_length"])
        plugins = {n: TimedPlugin(get_scenario(n, **options.get(n, {})), clock) for n in names}
        batches = MixedBatches(
            [Source(shards=str(root / "train" / n), scenario=n) for n in names],
            plugins,
            clock.timed("encode (template + tokenize)", encoder.encode),
            clock.timed("pack (collate)", row_collate(tokenizer.pad_token_id, pack=True)),
            batch_size=1,
            tokens=budget,
        )
        return iter(batches), encoder

    arms = {"mmscene": Clock(), "pre-tokenized": Clock()}
    streams = {
        "mmscene": stream(data, arms["mmscene"]),
        "pre-tokenized": stream(stored_root, arms["pre-tokenized"]),
    }
    models = {name: build(config) for name in (*arms, "plain")}
    totals = {name: [0.0, 0.0, 0.0, 0.0] for name in models}  # wall, CPU, data wall, data CPU
    tokens = 0
    for step in range(args.warmup + args.steps):
        timed = step >= args.warmup
        if timed and step == args.warmup:
            for clock in arms.values():
                clock.wall.clear(), clock.cpu.clear()
        got = {}
        for name in arms:  # fetch (decode, format, encode, pack) + step, one arm after the other
            t0, c0 = time.perf_counter(), time.process_time()
            got[name] = next(streams[name][0])
            t1, c1 = time.perf_counter(), time.process_time()
            train_step(*models[name], got[name])
            if timed:
                t2, c2 = time.perf_counter(), time.process_time()
                totals[name] = [a + b for a, b in zip(totals[name], (t2 - t0, c2 - c0, t1 - t0, c1 - c0))]
        if not torch.equal(got["mmscene"]["input_ids"], got["pre-tokenized"]["input_ids"]):
            raise SystemExit(f"step {step}: the pre-tokenized shards gave another batch")
        # plain: the same batch, already tensors in memory + the same step
        t0, c0 = time.perf_counter(), time.process_time()
        train_step(*models["plain"], got["mmscene"])
        if timed:
            totals["plain"][0] += time.perf_counter() - t0
            totals["plain"][1] += time.process_time() - c0
            tokens += got["mmscene"]["real_tokens"]
    del tmp
    shutil.rmtree(stored_root)
    hits = streams["pre-tokenized"][1].stored_counts
    print(
        f"torch {torch.__version__}, 1 thread; demo model {sum(p.numel() for p in probe.parameters()) / 1e6:.2f}M "
        f"params; {args.steps} packed steps ({args.max_tokens} tokens, rows of {args.row_tokens}), {tokens} tokens; "
        f"stored ids used for {hits['hit']} of {sum(hits.values())} samples"
    )
    print(f"{'loop':<38} {'wall s':>7} {'CPU s':>7} {'tokens/s':>9} {'share':>6}")
    plain_wall, plain_cpu = totals["plain"][:2]
    print(
        f"{'plain (batches in memory)':<38} {plain_wall:>7.2f} {plain_cpu:>7.2f} {tokens / plain_wall:>9.0f}"
    )
    labels = {"mmscene": "mmscene (from shards)", "pre-tokenized": "mmscene (pre-tokenized shards)"}
    for name, clock in arms.items():
        wall, cpu, data_wall, data_cpu = totals[name]
        print(f"{labels[name]:<38} {wall:>7.2f} {cpu:>7.2f} {tokens / wall:>9.0f}")
        print(f"{'  of which data':<38} {data_wall:>7.2f} {data_cpu:>7.2f} {'':>9} {data_wall / wall:>6.1%}")
        for stage in sorted(clock.wall, key=clock.wall.get, reverse=True):
            print(
                f"{'    ' + stage:<38} {clock.wall[stage]:>7.2f} {clock.cpu[stage]:>7.2f} {'':>9} "
                f"{clock.wall[stage] / wall:>6.1%}"
            )
    ours, stored = totals["mmscene"], totals["pre-tokenized"]
    print(
        f"summary: from shards {plain_wall / ours[0]:.2f}x the plain loop (CPU {plain_cpu / ours[1]:.2f}x), "
        f"data {ours[2] / ours[0]:.1%} of the step; pre-tokenized shards {plain_wall / stored[0]:.2f}x "
        f"(CPU {plain_cpu / stored[1]:.2f}x), data {stored[2] / stored[0]:.1%}; pre-tokenized vs from shards "
        f"{ours[0] / stored[0]:.2f}x (CPU {ours[1] / stored[1]:.2f}x)"
    )


if __name__ == "__main__":
    main()
