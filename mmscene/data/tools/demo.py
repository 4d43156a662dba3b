"""``mmscene data demo``: a synthetic four-scenario dataset that a tiny CPU model learns from pixels.

Every question is answerable from the media alone (colours, shapes, which image differs, which
way a square moves, which solid a mesh is), and every answer class is equally frequent, so the
chance levels written to ``summary.json`` are the baseline a trained demo model must beat.

The generator writes what a user would bring (LLaVA/M4-Instruct-style ``train.jsonl`` and
``val.jsonl`` beside real ``.png``/``.mp4``/``.glb`` files under ``OUT/raw``) and then runs the real
converter on it, so the demo exercises the same path as user data:

    OUT/raw/{train,val}.jsonl, OUT/raw/media/...     annotations + media
    OUT/{train,val}/<scenario>/shard-*.tar           converted WebDataset shards
    OUT/tokenizer/                                   a local BPE tokenizer for the tiny model
    OUT/summary.json, OUT/DONE                       counts, chance levels, parameters
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mmscene.data.pipeline.chat_template import render_chat
from mmscene.scenario import IMAGE_PLACEHOLDER

# Bump when the generated content changes, so an old OUT/DONE no longer counts as done.
DEMO_VERSION = 3
SPLITS = ("train", "val")
SCENARIOS = ("single_image", "multi_image", "video", "3d")
VIDEO_FPS = 4
# The tiny demo LLM (mmscene/model/configs/tiny-qwen2.json) has 512 embeddings.
TOKENIZER_VOCAB_SIZE = 512
OWNED = ("raw", "train", "val", "tokenizer", "summary.json", "DONE")

# Far apart in hue and each far from the light background, so they survive resizing and video
# chroma subsampling.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 195, 25),
}
BACKGROUND = (250, 250, 250)
# The shapes the odd image stands out from: a tiny model spots "the coloured one" in minutes,
# while comparing arbitrary colour pairs across images takes it far longer.
NEUTRAL = ("grey", (120, 120, 120))
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
SOLIDS = ("cube", "sphere", "cylinder", "cone")
ORDINALS = ("first", "second", "third")

MC_SUFFIX = "Answer with the option's letter from the given choices directly."
OE_SUFFIX = "Answer the question using a single word or phrase."
LETTERS = "ABCD"


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    scenario: str
    question: str
    classes: tuple[str, ...]
    option_template: str = "{}"  # how a class reads as a multiple-choice option
    option_counts: tuple[int, ...] = (3,)  # cycled over the multiple-choice samples

    def option_text(self, cls: str) -> str:
        return self.option_template.format(cls)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "demo_colour", "single_image", "What colour is the shape?", tuple(COLOURS), option_counts=(4, 3)
        ),
        Task("demo_shape", "single_image", "What shape is in the image?", SHAPES),
        Task("demo_odd_one", "multi_image", "Which image is different?", ORDINALS, "the {} image"),
        Task(
            "demo_motion", "video", "Which direction does the square move?", DIRECTIONS, option_counts=(4, 3)
        ),
        Task("demo_solid", "3d", "What shape is this object?", SOLIDS, option_counts=(4, 3)),
    )
}
SCENARIO_TASKS: dict[str, tuple[str, ...]] = {
    s: tuple(name for name, t in TASKS.items() if t.scenario == s) for s in SCENARIOS
}


# ---------------------------------------------------------------------------------------- public
def make_demo(
    out: Path | str,
    n_train_per_scenario: int = 800,
    n_val_per_scenario: int = 40,
    seed: int = 0,
    image_px: int = 64,
    num_frames: int = 6,
    progress: bool = True,
    option_order: str = "fixed",
) -> dict[str, Any]:
    """Generate (or find already generated) the demo dataset under ``out``; return its summary."""
    if n_train_per_scenario < 1 or n_val_per_scenario < 1:
        raise ValueError("the demo needs at least one train and one val sample per scenario")
    if image_px < 24 or image_px % 2:
        raise ValueError(f"image_px must be an even number >= 24 (yuv420p video), got {image_px}")
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2 for motion to be visible, got {num_frames}")
    if option_order not in ("fixed", "shuffled"):
        raise ValueError(f"option_order must be 'fixed' or 'shuffled', got {option_order!r}")
    out = Path(out)
    params = {
        "version": DEMO_VERSION,
        "n_train_per_scenario": n_train_per_scenario,
        "n_val_per_scenario": n_val_per_scenario,
        "seed": seed,
        "image_px": image_px,
        "num_frames": num_frames,
        "option_order": option_order,
    }
    done = out / "DONE"
    if done.is_file() and (out / "summary.json").is_file():
        try:
            if json.loads(done.read_text()) == params:
                return json.loads((out / "summary.json").read_text())
        except json.JSONDecodeError:
            pass  # a damaged marker: regenerate
    # A partial or differently parameterised run: clear only what this generator writes.
    for name in OWNED:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    raw = out / "raw"
    media_root = raw / "media"
    counts = {"train": n_train_per_scenario, "val": n_val_per_scenario}
    records: dict[str, list[dict[str, Any]]] = {}
    for split in SPLITS:
        records[split] = []
        for scenario in SCENARIOS:
            # One stream per (split, scenario): changing one count leaves the others' content intact.
            rng = random.Random(f"mmscene-demo:{seed}:{split}:{scenario}")
            gen = _Generator(rng, media_root, f"{split}/{scenario}", image_px, num_frames, option_order)
            items = _track(range(counts[split]), progress, f"demo {split}/{scenario}", total=counts[split])
            records[split] += [gen.sample(scenario, i, f"demo-{split}-{scenario}-{i:05d}") for i in items]
        _write_jsonl(raw / f"{split}.jsonl", records[split])
    t_generate = time.perf_counter() - start

    reports = {}
    for split in SPLITS:
        reports[split] = _convert_split(
            raw / f"{split}.jsonl", media_root, out / split, counts[split], progress
        )
        # Generated data has no defects: a skip here is a converter or generator bug, and a
        # quietly smaller demo set would skew the chance levels and per-scenario weights.
        written = reports[split].get("written", {})
        if _skipped_total(reports[split]) or written != {s: counts[split] for s in SCENARIOS}:
            raise RuntimeError(f"converting the demo {split} split lost samples: {reports[split]}")
    t_convert = time.perf_counter() - start - t_generate

    from mmscene.data.tools.local_tokenizer import save_tokenizer, train_tokenizer

    tokenizer = train_tokenizer(
        _tokenizer_corpus(records["train"] + records["val"]), vocab_size=TOKENIZER_VOCAB_SIZE
    )
    save_tokenizer(tokenizer, out / "tokenizer")

    summary = {
        "params": params,
        "counts": {split: _counts(records[split]) for split in SPLITS},
        "chance": _chance_levels(records["train"] + records["val"]),
        "shards": {
            split: {s: sorted(p.name for p in (out / split / s).glob("shard-*.tar")) for s in SCENARIOS}
            for split in SPLITS
        },
        "converter": reports,
        "tokenizer": {"path": "tokenizer", "vocab_size": len(tokenizer)},
        "seconds": {
            "generate": round(t_generate, 2),
            "convert": round(t_convert, 2),
            "total": round(time.perf_counter() - start, 2),
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    done.write_text(json.dumps(params) + "\n")  # last: its presence means every file above is complete
    return summary


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", required=True, type=Path, help="output folder (raw/, train/, val/, tokenizer/)"
    )
    parser.add_argument("--train-per-scenario", type=int, default=800, help="training samples per scenario")
    parser.add_argument("--val-per-scenario", type=int, default=40, help="validation samples per scenario")
    parser.add_argument("--seed", type=int, default=0, help="the dataset is a pure function of this seed")
    parser.add_argument(
        "--option-order",
        choices=["fixed", "shuffled"],
        default="fixed",
        help="multiple-choice options in each task's fixed order, or shuffled per sample (harder)",
    )


def demo_main(args: argparse.Namespace) -> int:
    summary = make_demo(
        args.out,
        n_train_per_scenario=args.train_per_scenario,
        n_val_per_scenario=args.val_per_scenario,
        seed=args.seed,
        progress=getattr(args, "progress", True),
        option_order=args.option_order,
    )
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mmscene demo dataset: {args.out}")
    for col in ("split", "scenario", "task", "multi-choice", "open-ended", "chance MC", "chance open"):
        table.add_column(col)
    for split, by_scenario in summary["counts"].items():
        for scenario, by_task in by_scenario.items():
            for task, by_type in by_task.items():
                chance = summary["chance"][task]
                table.add_row(
                    split,
                    scenario,
                    task,
                    str(by_type.get("multi-choice", 0)),
                    str(by_type.get("open-ended", 0)),
                    f"{chance['multi-choice']:.3f}",
                    f"{chance['open-ended']:.3f}",
                )
    console = Console()
    console.print(table)
    console.print(
        f"shards in {args.out}/{{train,val}}/<scenario>/, tokenizer in {args.out}/tokenizer "
        f"(vocab {summary['tokenizer']['vocab_size']}); generated in {summary['seconds']['total']} s"
    )
    return 0  # make_demo raises on any lost sample


# ------------------------------------------------------------------------------------ generation
class _Bag:
    """Draws items in shuffled rounds, so each appears equally often (±1) yet in no fixed order."""

    def __init__(self, items: Sequence[Any], rng: random.Random):
        self._items = list(items)
        self._rng = rng
        self._left: list[Any] = []

    def draw(self) -> Any:
        if not self._left:
            self._left = list(self._items)
            self._rng.shuffle(self._left)
        return self._left.pop()


class _Generator:
    """Samples of one (split, scenario): question plan, media files and the annotation record."""

    def __init__(
        self,
        rng: random.Random,
        media_root: Path,
        subdir: str,
        px: int,
        num_frames: int,
        option_order: str = "fixed",
    ):
        self.option_order = option_order
        self.rng = rng
        self.media_root = media_root
        self.subdir = subdir
        self.px = px
        self.num_frames = num_frames
        (media_root / subdir).mkdir(parents=True, exist_ok=True)
        self._bags: dict[Any, _Bag] = {}
        self._task_index: Counter[str] = Counter()
        self._mc_index: Counter[str] = Counter()

    def bag(self, key: Any, items: Sequence[Any]) -> _Bag:
        if key not in self._bags:
            self._bags[key] = _Bag(items, self.rng)
        return self._bags[key]

    def sample(self, scenario: str, i: int, sample_id: str) -> dict[str, Any]:
        tasks = SCENARIO_TASKS[scenario]
        task = TASKS[tasks[i % len(tasks)]]
        k = self._task_index[task.name]
        self._task_index[task.name] += 1
        # Alternate question types per task: half multiple choice, half open-ended.
        qtype = "multi-choice" if k % 2 == 0 else "open-ended"
        label = self.bag((task.name, qtype), task.classes).draw()
        media, prefix, extra = getattr(self, f"_media_{scenario}")(task, label, sample_id)
        question = f"{prefix}{task.question}\n"
        meta: dict[str, Any] = {"dataset": task.name, "question_type": qtype, "label": label, **extra}
        if qtype == "multi-choice":
            options, answer = self._options(task, label)
            question += "".join(f"{LETTERS[j]}. {text}\n" for j, text in enumerate(options)) + MC_SUFFIX
            meta["options"] = options
        else:
            question += OE_SUFFIX
            answer = label
        return {
            "id": sample_id,
            **media,
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
            "metadata": meta,
        }

    def _options(self, task: Task, label: str) -> tuple[list[str], str]:
        if self.option_order == "fixed":
            # Every class, in the task's own order: the letter follows from what is seen, which a
            # tiny model learns in minutes; "shuffled" also tests reading the options.
            return [task.option_text(c) for c in task.classes], LETTERS[task.classes.index(label)]
        j = self._mc_index[task.name]
        self._mc_index[task.name] += 1
        n = min(task.option_counts[j % len(task.option_counts)], len(task.classes))
        others = [c for c in task.classes if c != label]
        chosen = self.rng.sample(others, n - 1)
        self.rng.shuffle(chosen)
        # The correct letter comes from its own balanced bag: independent of the class, so
        # neither the letter nor the option order leaks the answer.
        pos = self.bag((task.name, "letter", n), range(n)).draw()
        chosen.insert(pos, label)
        return [task.option_text(c) for c in chosen], LETTERS[pos]

    def _path(self, sample_id: str, suffix: str) -> tuple[Path, str]:
        rel = f"{self.subdir}/{sample_id}{suffix}"
        return self.media_root / rel, rel

    # -- per scenario: (media fields of the record, text before the question, extra metadata)
    def _media_single_image(self, task: Task, label: str, sample_id: str):
        colour = label if task.name == "demo_colour" else self.rng.choice(list(COLOURS))
        shape = label if task.name == "demo_shape" else self.rng.choice(SHAPES)
        path, rel = self._path(sample_id, ".png")
        draw_shape(shape, COLOURS[colour], self.px, self.rng).save(path)
        return {"image": [rel]}, f"{IMAGE_PLACEHOLDER}\n", {"colour": colour, "shape": shape}

    def _media_multi_image(self, task: Task, label: str, sample_id: str):
        odd = ORDINALS.index(label)
        shape = self.rng.choice(SHAPES)
        common, different = NEUTRAL[0], self.rng.choice(list(COLOURS))
        palette = {**COLOURS, NEUTRAL[0]: NEUTRAL[1]}
        rels = []
        for j in range(len(ORDINALS)):
            path, rel = self._path(sample_id, f".{j}.png")
            draw_shape(shape, palette[different if j == odd else common], self.px, self.rng).save(path)
            rels.append(rel)
        prefix = "".join(f"Image {j + 1}: {IMAGE_PLACEHOLDER}\n" for j in range(len(rels)))
        return {"image": rels}, prefix, {"shape": shape, "colour": common, "odd_colour": different}

    def _media_video(self, task: Task, label: str, sample_id: str):
        colour = self.rng.choice(list(COLOURS))
        frames = motion_frames(label, COLOURS[colour], self.px, self.num_frames, self.rng)
        path, rel = self._path(sample_id, ".mp4")
        write_mp4(frames, path, VIDEO_FPS)
        extra = {"colour": colour, "fps": VIDEO_FPS, "num_frames": self.num_frames}
        return {"video": rel}, f"{IMAGE_PLACEHOLDER}\n", extra

    def _media_3d(self, task: Task, label: str, sample_id: str):
        colour = self.rng.choice(list(COLOURS))
        mesh = solid_mesh(label, COLOURS[colour], self.rng)
        path, rel = self._path(sample_id, ".glb")
        path.write_bytes(mesh.export(file_type="glb"))
        return {"mesh": rel}, f"{IMAGE_PLACEHOLDER}\n", {"colour": colour, "up_axis": "y"}


def draw_shape(shape: str, colour: tuple[int, int, int], px: int, rng: random.Random) -> Image.Image:
    """A filled shape of 45-70% of the image side at a random place, fully inside the frame."""
    img = Image.new("RGB", (px, px), BACKGROUND)
    draw = ImageDraw.Draw(img)
    size = round(rng.uniform(0.45, 0.7) * px)
    margin = max(1, px // 32)
    x0 = rng.randint(margin, px - size - margin)
    y0 = rng.randint(margin, px - size - margin)
    x1, y1 = x0 + size - 1, y0 + size - 1
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return img


def motion_frames(
    direction: str, colour: tuple[int, int, int], px: int, num_frames: int, rng: random.Random
) -> list[np.ndarray]:
    """A square (a quarter of the side) moving at constant speed over 70-100% of the free track."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}")
    size = px // 4
    margin = max(1, px // 32)
    free = px - size - 2 * margin
    travel = rng.uniform(0.7, 1.0) * free
    start = margin + rng.uniform(0, free - travel)
    across = rng.randint(margin, px - size - margin)
    frames = []
    for t in range(num_frames):
        along = start + travel * t / (num_frames - 1)
        if direction in ("left", "up"):
            along = px - size - along  # mirror of the right/down track
        x, y = (round(along), across) if direction in ("left", "right") else (across, round(along))
        frame = np.empty((px, px, 3), np.uint8)
        frame[:] = BACKGROUND
        frame[y : y + size, x : x + size] = colour
        frames.append(frame)
    return frames


def write_mp4(frames: Sequence[np.ndarray], path: Path, fps: int) -> None:
    """MPEG-4 part 2, yuv420p, one GOP, no B-frames: few KB, and decord reads every frame back."""
    import av

    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = frames[0].shape[1]
        stream.height = frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = len(frames)
        # B-frames reorder timestamps; without them decode order = display order.
        stream.codec_context.max_b_frames = 0
        stream.codec_context.thread_count = 1  # same bytes on every machine
        stream.options = {"qscale": "3"}  # near-lossless for flat colours at a few KB
        container.metadata["encoder"] = "mmscene-demo"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def solid_mesh(kind: str, colour: tuple[int, int, int], rng: random.Random):
    """A unit-sized solid with one vertex colour, +Y up (glTF), randomly turned about +Y."""
    import trimesh

    if kind == "cube":
        mesh = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    elif kind == "sphere":
        mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.6)
    elif kind == "cylinder":
        mesh = trimesh.creation.cylinder(radius=0.5, height=1.1, sections=24)
    elif kind == "cone":
        mesh = trimesh.creation.cone(radius=0.6, height=1.1, sections=24)
    else:
        raise ValueError(f"unknown solid {kind!r}")
    mesh.apply_translation(-mesh.bounds.mean(axis=0))
    # trimesh builds cylinders and cones along +Z; glTF's up is +Y.
    mesh.apply_transform(trimesh.transformations.rotation_matrix(-math.pi / 2, (1, 0, 0)))
    mesh.apply_transform(trimesh.transformations.rotation_matrix(rng.uniform(0, 2 * math.pi), (0, 1, 0)))
    mesh.apply_scale(rng.uniform(0.85, 1.15))
    rgba = np.array([*colour, 255], np.uint8)
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=np.tile(rgba, (len(mesh.vertices), 1)))
    return mesh


# ------------------------------------------------------------------------------------- plumbing
def _convert_split(annotations: Path, media_root: Path, out: Path, n: int, progress: bool) -> dict[str, Any]:
    from mmscene.data.ingest.convert import convert

    # About four shards per scenario, so that several dataloader workers / ranks each get one.
    shard_size = max(1, math.ceil(n / 4))
    rules = {name: task.scenario for name, task in TASKS.items()}
    return convert(
        annotations,
        media_root,
        out,
        scenario="auto",
        shard_size=shard_size,
        workers=1,
        dataset_rules=rules,
        progress=progress,
    )


def _skipped_total(report: Any) -> int:
    skipped = report.get("skipped", 0) if isinstance(report, dict) else 0
    if isinstance(skipped, dict):
        return sum(int(v) for v in skipped.values())
    if isinstance(skipped, list):
        return len(skipped)
    return int(skipped)


def _write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def _tokenizer_corpus(records: Iterable[dict[str, Any]]) -> list[str]:
    # Rendered as the ChatML turns the encoder will tokenize, so merges cover role headers too.
    return [
        render_chat(
            [
                {"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                for t in record["conversations"]
            ]
        )
        for record in records
    ]


def _counts(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, dict[str, int]]]:
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for record in records:
        meta = record["metadata"]
        scenario = TASKS[meta["dataset"]].scenario
        by_type = counts.setdefault(scenario, {}).setdefault(meta["dataset"], {})
        by_type[meta["question_type"]] = by_type.get(meta["question_type"], 0) + 1
    return counts


def _chance_levels(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Expected score of uniform guessing: 1/options per multi-choice sample, 1/classes open-ended."""
    guesses: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        meta = record["metadata"]
        task = TASKS[meta["dataset"]]
        n = len(meta["options"]) if meta["question_type"] == "multi-choice" else len(task.classes)
        guesses[task.name][meta["question_type"]].append(1.0 / n)
    chance = {}
    for name in TASKS:
        by_type = {qt: float(np.mean(v)) for qt, v in guesses[name].items()}
        all_values = [x for v in guesses[name].values() for x in v]
        chance[name] = {
            "multi-choice": round(by_type.get("multi-choice", 0.0), 4),
            "open-ended": round(by_type.get("open-ended", 0.0), 4),
            "overall": round(float(np.mean(all_values)) if all_values else 0.0, 4),
        }
    return chance


def _track(items: Iterable[Any], progress: bool, description: str, total: int) -> Iterable[Any]:
    if not progress:
        return items
    from rich.progress import track

    return track(items, description=description, total=total, transient=True)


__all__ = [
    "COLOURS",
    "DIRECTIONS",
    "SCENARIOS",
    "SCENARIO_TASKS",
    "SHAPES",
    "SOLIDS",
    "TASKS",
    "add_demo_arguments",
    "demo_main",
    "draw_shape",
    "make_demo",
    "motion_frames",
    "solid_mesh",
    "write_mp4",
]
