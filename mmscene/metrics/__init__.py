"""Scoring of generated answers as torchmetrics ``Metric`` objects.

All metrics share ``update(preds, targets, options=None)`` so callers can loop over a dict of
them; ``options`` (per-sample ``{"A": text, ...}`` or ``None``) only matters to
:class:`MultipleChoiceAccuracy`.
"""

from __future__ import annotations

from collections.abc import Mapping

from torchmetrics import Metric

from mmscene.metrics.choice import MultipleChoiceAccuracy, parse_choice
from mmscene.metrics.cider import Cider
from mmscene.metrics.text import Bleu, ExactMatch, RougeL, rouge_l_f1
from mmscene.metrics.tokenize import ptb_tokenize, squad_normalize

__all__ = [
    "Bleu",
    "Cider",
    "ExactMatch",
    "MultipleChoiceAccuracy",
    "RougeL",
    "caption_metrics",
    "default_metrics",
    "overall_score",
    "parse_choice",
    "ptb_tokenize",
    "rouge_l_f1",
    "squad_normalize",
]


def default_metrics(question_type: str) -> dict[str, Metric]:
    """LLaVA-Interleave Bench scoring: option accuracy, or ROUGE-L F1 for open answers."""
    if question_type == "multi-choice":
        return {"accuracy": MultipleChoiceAccuracy()}
    if question_type == "open-ended":
        return {"rouge_l": RougeL()}
    raise ValueError(f"unknown question_type {question_type!r} (expected 'multi-choice' or 'open-ended')")


def caption_metrics() -> dict[str, Metric]:
    """ScanQA-style 3D QA scores. METEOR is left out: coco's METEOR 1.5 is a Java jar with
    paraphrase tables, not something a Metric can reproduce cheaply."""
    metrics: dict[str, Metric] = {f"bleu_{n}": Bleu(n) for n in range(1, 5)}
    metrics["rouge_l"] = RougeL()
    metrics["cider"] = Cider()
    return metrics


def overall_score(per_task: Mapping[str, float]) -> float:
    """LLaVA-Interleave Bench overall: unweighted mean over task categories."""
    if not per_task:
        raise ValueError("no task scores to average")
    return sum(float(v) for v in per_task.values()) / len(per_task)
