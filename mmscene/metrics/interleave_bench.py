"""LLaVA-Interleave Bench's task categories, as lmms-eval groups them for its overall score.

The overall is the unweighted mean over categories of each category's score, where a
category's score is the mean over *all its samples* (sub-tasks weighted by their sizes), as in
lmms-eval's ``overall_score`` (tasks/llava_interleave_bench/utils.py). A task not in the table
is a category of its own.
"""

from __future__ import annotations

BENCH_CATEGORIES: dict[str, tuple[str, ...]] = {
    "Spot-the-Diff": ("Spot-the-Diff", "Birds-to-Words", "CLEVR-Change"),
    "Image-Edit": ("IEdit", "HQ-Edit", "MagicBrush"),
    "Visual-Story-Telling": ("AESOP", "FlintstonesSV", "PororoSV", "VIST"),
    "Visual-Cloze": ("COMICS_Dialogue", "RecipeQA_VisualCloze"),
    "Text-Rich-VQA": ("WebQA", "TQA", "OCR-VQA", "DocVQA"),
    "Multi-Image-VQA": (
        "MIT-States_StateCoherence",
        "MIT-States_PropertyCoherence",
        "VISION",
        "RecipeQA_ImageCoherence",
    ),
    "Puzzle": ("RAVEN",),
    "NLVR2": ("NLVR2_Mantis",),
    "QBench": ("QBench",),
    "ScanQA": ("ScanQA",),
    "ALFRED": ("ALFRED",),
    "nuscenes": ("nuscenes",),
    "ScanNet_chat": ("ScanNet_chat",),
    "ScanNet_task": ("ScanNet_task",),
    "BLINK": ("BLINK",),
    "MathVerse": ("MathVerse",),
    "SciVerse": ("SciVerse",),
    "Mantis": ("Mantis",),
}
# The multi-view (3D) part of the bench, lmms-eval's llava_interleave_bench_multi_view: 3D
# scenes given as sets of views.
MULTI_VIEW_CATEGORIES = ("ScanQA", "ALFRED", "nuscenes", "ScanNet_chat", "ScanNet_task")
MULTI_VIEW_SUB_TASKS = frozenset(t for c in MULTI_VIEW_CATEGORIES for t in BENCH_CATEGORIES[c])

_CATEGORY = {task: category for category, tasks in BENCH_CATEGORIES.items() for task in tasks}
_MULTI_VIEW = frozenset(name.casefold() for name in MULTI_VIEW_SUB_TASKS)


def category_of(task: str) -> str | None:
    """The bench category of sub-task ``task``, or ``None`` for a task outside the bench."""
    return _CATEGORY.get(task)


def is_multi_view(sub_task: str) -> bool:
    """Whether ``sub_task`` is one of the bench's multi-view sub-tasks (case aside)."""
    return isinstance(sub_task, str) and sub_task.casefold() in _MULTI_VIEW
