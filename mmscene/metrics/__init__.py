"""Scoring of generated answers as torchmetrics ``Metric`` objects.

All metrics share ``update(preds, targets, options=None)`` so callers can loop over a dict of
them; ``options`` (per-sample ``{"A": text, ...}`` or ``None``) only matters to
:class:`MultipleChoiceAccuracy`.

Scoring follows lmms-eval's LLaVA-Interleave-Bench rules by default, so numbers sit next to
published ones; ``SCORINGS`` names the choice (``use_scoring`` switches a set of metrics).
"""

from __future__ import annotations

from collections.abc import Mapping

from torchmetrics import Metric

from mmscene.metrics.choice import (
    MultipleChoiceAccuracy,
    harness_choice,
    harness_choice_correct,
    parse_choice,
)
from mmscene.metrics.cider import Cider
from mmscene.metrics.interleave_bench import BENCH_CATEGORIES, category_of
from mmscene.metrics.text import Bleu, ExactMatch, RougeL, harness_rouge_l, rouge_l_f1
from mmscene.metrics.tokenize import ptb_tokenize, squad_normalize

__all__ = [
    "BENCH_CATEGORIES",
    "SCORINGS",
    "Bleu",
    "Cider",
    "ExactMatch",
    "MultipleChoiceAccuracy",
    "RougeL",
    "caption_metrics",
    "category_of",
    "default_metrics",
    "harness_choice",
    "harness_choice_correct",
    "harness_rouge_l",
    "overall_score",
    "parse_choice",
    "ptb_tokenize",
    "rouge_l_f1",
    "squad_normalize",
    "use_scoring",
]

# "lmms-eval": the harness's option and ROUGE-L rules; "mmscene": the stricter option parser
# and rouge-score's ROUGE-L (see mmscene.metrics.choice and mmscene.metrics.text).
SCORINGS = ("lmms-eval", "mmscene")


def default_metrics(question_type: str) -> dict[str, Metric]:
    """LLaVA-Interleave Bench scoring: option accuracy, or ROUGE-L F1 for open answers."""
    if question_type == "multi-choice":
        return {"accuracy": MultipleChoiceAccuracy()}
    if question_type == "open-ended":
        return {"rouge_l": RougeL()}
    raise ValueError(f"unknown question_type {question_type!r} (expected 'multi-choice' or 'open-ended')")


def caption_metrics() -> dict[str, Metric]:
    """ScanQA-style 3D QA scores. ROUGE-L comes first: it is the task's headline, the score
    LLaVA-Interleave Bench gives its ScanQA-style sub-tasks. METEOR is left out: coco's
    METEOR 1.5 is a Java jar with paraphrase tables, not something a Metric can reproduce cheaply."""
    metrics: dict[str, Metric] = {"rouge_l": RougeL()}
    metrics.update({f"bleu_{n}": Bleu(n) for n in range(1, 5)})
    metrics["cider"] = Cider()
    return metrics


def use_scoring(metrics: Mapping[str, Metric], scoring: str) -> None:
    """Switch the option and ROUGE-L metrics among ``metrics`` to ``scoring``'s rules."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    for metric in metrics.values():
        if isinstance(metric, MultipleChoiceAccuracy):
            metric.rule = scoring
        elif isinstance(metric, RougeL):
            metric.rule = "lmms-eval" if scoring == "lmms-eval" else "rouge-score"


def overall_score(per_task: Mapping[str, float]) -> float:
    """LLaVA-Interleave Bench overall: unweighted mean over category scores."""
    if not per_task:
        raise ValueError("no task scores to average")
    return sum(float(v) for v in per_task.values()) / len(per_task)
