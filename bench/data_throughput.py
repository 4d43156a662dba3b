"""Data loader throughput: mmscene shards vs LLaVA-NeXT-style per-file loading, on the same samples.

Both loaders produce the same tensors for the same sample (checked before timing):

  mmscene    WebDataset shards -> scenario plugin load (decode from the tar's bytes) -> format
             -> PromptEncoder -> pad_collate, as a DataLoader over ``MixedBatches`` (one source)
  baseline   LLaVA-NeXT's ``LazySupervisedDataset`` pattern: the annotation list (``train.jsonl``)
             in memory, every media file opened per sample from its folder (PIL for images, decord
             for videos, trimesh + mmscene's renderer for meshes), then the same format,
             PromptEncoder and pad_collate; a map-style DataLoader with random sampling

Rows: each scenario alone, and all four mixed with equal weights. Columns: samples/s with 1 and 2
DataLoader workers after start-up (the first batch is not timed), fastest of ``--rounds`` rounds
run in alternating order (the machine may be shared; the fastest round is the least disturbed),
and a second table of the workers' CPU milliseconds per sample over the same windows, which other
jobs on the machine disturb much less than wall-clock rates. The demo dataset's ``raw/`` folder
holds exactly the annotations and media its shards were converted from. Files are read from the
page cache: what opening many small files costs on a network filesystem is not measured here.

  python bench/data_throughput.py                       # generates 4 x 100 demo samples, ~2 min on 2 cores
  python bench/data_throughput.py --data data/demo      # an existing `mmscene data demo --out` folder
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from functools import partial
from pathlib import Path

import torch
from demo_data import add_demo_data_arguments, demo_data
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler

from mmscene.data.media.decode import uniform_indices
from mmscene.data.pipeline.collate import pad_collate
from mmscene.data.pipeline.encode import ImageGeometry, PromptEncoder
from mmscene.data.pipeline.mixer import MixedBatches, Source
from mmscene.registry import get_scenario
from mmscene.scenario import Example

SCENARIOS = ("single_image", "multi_image", "video", "3d")
MIXED = "mixed (4 sources)"
REPO = Path(__file__).resolve().parents[1]
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


# ------------------------------------------------------------------------------ baseline
def scenario_of(record: dict) -> str:
    # the demo's records: what `mmscene data convert --scenario auto` infers for them
    if "video" in record:
        return "video"
    if "mesh" in record:
        return "3d"
    return "single_image" if len(record["image"]) == 1 else "multi_image"


class LlavaStyleDataset(Dataset):
    """Annotation records in memory; each item opens and decodes its media files from disk."""

    def __init__(self, records: list[dict], media_root: Path, plugins: dict, encode):
        self.records = records
        self.root = media_root
        self.plugins = plugins
        self.encode = encode

    def __len__(self) -> int:
        return len(self.records)

    def example(self, index: int) -> Example:
        rec = self.records[index]
        scenario = scenario_of(rec)
        plugin = self.plugins[scenario]
        images, frames, times = [], [], []
        if "image" in rec:
            images = [Image.open(self.root / p).convert("RGB") for p in rec["image"]]
            media = [{"member": f"{i}.png", "type": "image"} for i in range(len(images))]
        elif "video" in rec:
            import decord

            reader = decord.VideoReader(str(self.root / rec["video"]), ctx=decord.cpu(0), num_threads=1)
            indices = uniform_indices(len(reader), min(plugin.num_frames, plugin.max_frames))
            frames = [Image.fromarray(f) for f in reader.get_batch(indices).asnumpy()]
            times = [round(float(t), 3) for t in reader.get_frame_timestamp(indices)[:, 0]]
            media = [{"member": "mp4", "type": "video"}]
        else:
            import trimesh

            from mmscene.data.media.render import render_views

            geometry = trimesh.load(str(self.root / rec["mesh"]))
            images = render_views(
                geometry,
                plugin.num_views,
                plugin.view_size,
                plugin.elevation_deg,
                fov_deg=plugin.fov_deg,
                up=rec.get("metadata", {}).get("up_axis", plugin.up_axis),
                supersample=plugin.supersample,
            )
            media = [{"member": Path(rec["mesh"]).suffix[1:], "type": "mesh"}]
        meta = rec.get("metadata", {})
        conversation = [{"role": ROLES[t["from"]], "content": t["value"]} for t in rec["conversations"]]
        record = {"id": rec["id"], "media": media, "metadata": meta}  # what the formatters look at
        return Example(
            key=rec["id"],
            scenario=scenario,
            task=meta.get("dataset", "default"),
            conversation=conversation,
            images=images,
            frames=frames,
            frame_times=times,
            question_type=meta.get("question_type", "open-ended"),
            record=record,
        )

    def __getitem__(self, index: int) -> dict:
        example = self.example(index)
        prompt = self.plugins[example.scenario].format(example, random.Random(index))
        return self.encode(prompt)


# ------------------------------------------------------------------------------ loaders
def mmscene_loader(data: Path, scenarios, plugins, encoder, pad_id, batch_size, workers) -> DataLoader:
    sources = [Source(shards=str(data / "train" / s), scenario=s) for s in scenarios]
    dataset = MixedBatches(
        sources, plugins, encoder.encode, partial(pad_collate, pad_id=pad_id), batch_size=batch_size
    )
    return DataLoader(dataset, batch_size=None, num_workers=workers)


def baseline_loader(records, media_root, plugins, encoder, pad_id, batch_size, workers) -> DataLoader:
    dataset = LlavaStyleDataset(records, media_root, plugins, encoder.encode)
    # endless random order without restarting workers at epoch ends, like the mmscene stream
    sampler = RandomSampler(dataset, num_samples=10**8, generator=torch.Generator().manual_seed(0))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=partial(pad_collate, pad_id=pad_id),
    )


def _cpu_seconds(pids: list[int]) -> float | None:
    """User + system CPU time of these processes (Linux /proc), or None where unavailable."""
    total = 0
    try:
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    except (OSError, IndexError, ValueError):
        return None
    return total / os.sysconf("SC_CLK_TCK")


def measure(loader: DataLoader, seconds: float, min_batches: int = 3) -> tuple[float, float | None]:
    """Samples/s after the first batch (worker start-up is not timed), and the workers' CPU
    milliseconds per sample over the same window: a cost that a busy machine does not inflate
    the way it inflates wall time."""
    it = iter(loader)
    next(it)
    pids = [w.pid for w in getattr(it, "_workers", [])]  # private, hence the None fallback
    cpu0 = _cpu_seconds(pids) if pids else None
    samples, batches = 0, 0
    start = time.perf_counter()
    while batches < min_batches or time.perf_counter() - start < seconds:
        batch = next(it)
        samples += batch["input_ids"].shape[0]
        batches += 1
    elapsed = time.perf_counter() - start
    cpu1 = _cpu_seconds(pids) if pids else None
    del it  # shuts the workers down before the next measurement
    cpu_ms = None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) * 1000 / samples
    return samples / elapsed, cpu_ms


# ------------------------------------------------------------------------------ setup
def plugin_options(config: Path | None) -> dict[str, dict]:
    if config is None or not config.is_file():
        return {}
    import yaml

    data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
    return {str(k): dict(v or {}) for k, v in (data.get("scenarios") or {}).items()}


def check_same_tensors(data: Path, records, plugins, encoder) -> int:
    """Encode the first sample of each scenario both ways; they must match exactly."""
    import webdataset as wds

    baseline = LlavaStyleDataset(records, data / "raw" / "media", plugins, encoder.encode)
    index = {r["id"]: i for i, r in enumerate(records)}
    checked = 0
    for scenario in SCENARIOS:
        shard = sorted((data / "train" / scenario).glob("*.tar"))[0]
        with open(shard, "rb") as f:
            files = ({**x, "__url__": str(shard)} for x in wds.tariterators.tar_file_iterator(f))
            sample = next(iter(wds.tariterators.group_by_keys(files)))
        i = index[json.loads(sample["json"])["id"]]
        plugin = plugins[scenario]
        ours = encoder.encode(plugin.format(plugin.load(sample), random.Random(i)))
        theirs = baseline[i]
        for key in ("input_ids", "labels", "pixel_values", "image_pooling"):
            if not torch.equal(ours[key], theirs[key]):
                raise SystemExit(f"{scenario}: the two loaders disagree on {key} of {sample['__key__']}")
        checked += 1
    return checked


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_demo_data_arguments(parser)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml", help="plugin options")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=1.0, help="timed seconds per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per measurement; the fastest counts")
    parser.add_argument("--image-size", type=int, default=384, help="vision tower input (SigLIP: 384)")
    parser.add_argument("--tokens-per-image", type=int, default=729)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    data, tmp = demo_data(args)
    options = plugin_options(args.config)
    plugins = {s: get_scenario(s, **options.get(s, {})) for s in SCENARIOS}
    tok = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    geometry = ImageGeometry(
        args.image_size, tok.convert_tokens_to_ids("<image>"), args.tokens_per_image, args.tokens_per_image
    )
    encoder = PromptEncoder(tok, geometry)
    records = [json.loads(line) for line in (data / "raw" / "train.jsonl").read_text().splitlines() if line]
    checked = check_same_tensors(data, records, plugins, encoder)
    print(
        f"data {data}: {len(records)} samples; plugin options {options or 'defaults'}; "
        f"images {args.image_size}px, {args.tokens_per_image} tokens; batch {args.batch_size}; "
        f"identical tensors from both loaders on {checked}/{len(SCENARIOS)} checked samples"
    )

    rows = [(s, [s]) for s in SCENARIOS] + [(MIXED, list(SCENARIOS))]
    results: dict[tuple[str, str, int], float] = {}  # samples/s, fastest round
    cpu: dict[tuple[str, str, int], float] = {}  # worker CPU ms per sample, cheapest round
    for round_ in range(args.rounds):
        for label, scenarios in rows:
            subset = [r for r in records if scenario_of(r) in scenarios]
            for workers in args.workers:
                loaders = {
                    "mmscene": partial(
                        mmscene_loader,
                        data,
                        scenarios,
                        plugins,
                        encoder,
                        tok.pad_token_id,
                        args.batch_size,
                        workers,
                    ),
                    "baseline": partial(
                        baseline_loader,
                        subset,
                        data / "raw" / "media",
                        plugins,
                        encoder,
                        tok.pad_token_id,
                        args.batch_size,
                        workers,
                    ),
                }
                order = list(loaders.items())
                for name, make in order if round_ % 2 == 0 else order[::-1]:  # neither always goes first
                    rate, cpu_ms = measure(make(), args.seconds)
                    key = (label, name, workers)
                    results[key] = max(results.get(key, 0.0), rate)
                    if cpu_ms is not None:
                        cpu[key] = min(cpu.get(key, float("inf")), cpu_ms)

    w = args.workers
    head = [f"mmscene {n}w" for n in w] + [f"baseline {n}w" for n in w] + [f"ratio {n}w" for n in w]
    lines = ["| scenario | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for label, _ in rows:
        ours = [results[(label, "mmscene", n)] for n in w]
        theirs = [results[(label, "baseline", n)] for n in w]
        cells = [f"{x:.1f}" for x in ours + theirs] + [f"{a / b:.2f}x" for a, b in zip(ours, theirs)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    best = max(w)
    ours, theirs = results[(MIXED, "mmscene", best)], results[(MIXED, "baseline", best)]
    print(
        f"\nmixed, {best} worker(s): mmscene {ours:.1f} samples/s vs LLaVA-style per-file baseline "
        f"{theirs:.1f} samples/s ({ours / theirs:.2f}x)\n"
    )
    print(f"samples/s (fastest of {args.rounds} rounds of {args.seconds:g} s each, after start-up):")
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:  # other jobs take CPU share at random: wall-clock rates then swing by tens of %
        print(f"(load average {load:.1f} on {cores} cores: compare the CPU ms per sample below)")
    print("\n".join(lines))
    if len(cpu) == len(results):
        head = [f"{who} {n}w" for who in ("mmscene", "baseline") for n in w] + [f"ratio {n}w" for n in w]
        lines = ["| scenario | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
        for label, _ in rows:
            ours = [cpu[(label, "mmscene", n)] for n in w]
            theirs = [cpu[(label, "baseline", n)] for n in w]
            # a cost: baseline / mmscene, so that > 1 means mmscene is cheaper, as above
            cells = [f"{x:.1f}" for x in ours + theirs] + [f"{b / a:.2f}x" for a, b in zip(ours, theirs)]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        print("\nworker CPU ms per sample (cheapest round; ratio = baseline / mmscene):")
        print("\n".join(lines))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
