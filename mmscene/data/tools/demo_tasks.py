"""The demo's tasks and the generator of their samples: a question plan with balanced answer
classes, the media files (:mod:`.demo_media`) and the LLaVA-style annotation record of each."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmscene.data.tools.demo_media import (
    COLOURS,
    DIRECTIONS,
    NEUTRAL,
    SHAPES,
    SOLIDS,
    draw_shape,
    motion_frames,
    solid_mesh,
    write_mp4,
)
from mmscene.scenario import IMAGE_PLACEHOLDER

SCENARIOS = ("single_image", "multi_image", "video", "3d")
VIDEO_FPS = 4
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


class Bag:
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


class Generator:
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
        self._bags: dict[Any, Bag] = {}
        self._task_index: Counter[str] = Counter()
        self._mc_index: Counter[str] = Counter()

    def bag(self, key: Any, items: Sequence[Any]) -> Bag:
        if key not in self._bags:
            self._bags[key] = Bag(items, self.rng)
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
        draw_shape(shape, COLOURS[colour], self.px, self.rng, centred=True).save(path)
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
