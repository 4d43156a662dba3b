"""Open-ended answer metrics: ROUGE-L F1, corpus BLEU-n, exact match.

ROUGE-L has two rules. ``"lmms-eval"`` (the default) is LLaVA-Interleave-Bench's ``oe_rogue``:
the ``rouge`` package's summary-level ROUGE-L F (sentences split on ".", case kept, the
prediction cut to 512 characters, an empty prediction scoring 0). ``"rouge-score"`` is Google's
``rouge_score`` sentence-level ROUGE-L F1 on lower-cased word tokens, the number most captioning
papers print. They differ (case, sentence splitting), so the rule is part of a score's name in
docs/evaluation.md.

Every metric takes ``update(preds, targets, options=None)``; a target is one reference string
or a list of references. All state is summed tensors, so syncing is one all-reduce per state
no matter how many samples each rank saw.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from mmscene.metrics.tokenize import ptb_tokenize, reference_lists, rouge_tokenize, squad_normalize

Targets = Sequence[str | Sequence[str]]


class _TextMetric(Metric):
    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    @staticmethod
    def _pairs(preds: Sequence[str], targets: Targets) -> list[tuple[str, list[str]]]:
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")
        return list(zip(preds, reference_lists(targets)))


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0  # row[j-1] of the previous line
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


ROUGE_RULES = ("lmms-eval", "rouge-score")
HARNESS_ROUGE_CHARS = 512  # oe_rogue cuts predictions to this many characters


def harness_rouge_l(pred: str, ref: str) -> float:
    """LLaVA-Interleave-Bench's ``oe_rogue(ref, pred)``, through the same ``rouge`` package.

    Where the package raises (a prediction or reference with no words between its periods,
    e.g. "."), lmms-eval's evaluation stops; here the sample scores 0 instead.
    """
    from rouge import Rouge

    if pred == "":
        return 0.0
    try:
        return float(
            Rouge(metrics=["rouge-l"]).get_scores(pred[:HARNESS_ROUGE_CHARS], ref)[0]["rouge-l"]["f"]
        )
    except ValueError:  # "Hypothesis is empty." / "Reference is empty."
        return 0.0


def rouge_l_f1(pred: str, ref: str) -> float:
    """Sentence-level ROUGE-L F1 exactly as ``rouge_score.RougeScorer(['rougeL'])``."""
    p, r = rouge_tokenize(pred), rouge_tokenize(ref)
    lcs = _lcs(p, r) if p and r else 0
    return 0.0 if lcs == 0 else 2 * lcs / (len(p) + len(r))


class RougeL(_TextMetric):
    """Mean ROUGE-L F1 under ``rule`` (best reference per sample, as rouge-score's ``score_multi``).

    Not torchmetrics' ``ROUGEScore``: its numbers agree, but it keeps one 0-d tensor per sample
    in a list state with ``dist_reduce_fx=None``, which syncs with one all-gather per sample and
    breaks when ranks hold different sample counts (checked with gloo: the collective fails).
    """

    def __init__(self, rule: str = "lmms-eval", **kwargs) -> None:
        super().__init__(**kwargs)
        if rule not in ROUGE_RULES:
            raise ValueError(f"ROUGE-L rule must be one of {ROUGE_RULES}, got {rule!r}")
        self.rule = rule
        self.add_state("f1_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], targets: Targets, options=None) -> None:
        pairs = self._pairs(preds, targets)
        score = harness_rouge_l if self.rule == "lmms-eval" else rouge_l_f1
        self.f1_sum += sum(max(score(p, r) for r in refs) for p, refs in pairs)
        self.total += len(pairs)

    def compute(self) -> Tensor:
        return (self.f1_sum / self.total.clamp(min=1)).float()


class Bleu(_TextMetric):
    """Corpus BLEU-n exactly as pycocoevalcap's ``Bleu`` (``option='closest'``) on PTB tokens.

    Not torchmetrics' ``BLEUScore``, which differs in two places: it takes the first of equally
    close reference lengths (coco takes the shorter one), and it returns 0 when some n-gram order
    has no match where coco's ``+1e-15`` leaves a tiny positive score.
    """

    def __init__(self, n: int = 4, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n = n
        self.add_state("correct", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("guess", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("testlen", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("reflen", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], targets: Targets, options=None) -> None:
        correct, guess, testlen, reflen = [0] * self.n, [0] * self.n, 0, 0
        for pred, refs in self._pairs(preds, targets):
            hyp = ptb_tokenize(pred)
            ref_toks = [ptb_tokenize(r) for r in refs]
            max_ref = Counter()
            for ref in ref_toks:
                max_ref |= _ngrams(ref, self.n)
            for gram, count in (_ngrams(hyp, self.n) & max_ref).items():
                correct[len(gram) - 1] += count
            for k in range(self.n):
                guess[k] += max(0, len(hyp) - k)
            testlen += len(hyp)
            reflen += min((abs(len(r) - len(hyp)), len(r)) for r in ref_toks)[1]
        self.correct += torch.tensor(correct, device=self.device)
        self.guess += torch.tensor(guess, device=self.device)
        self.testlen += testlen
        self.reflen += reflen

    def compute(self) -> Tensor:
        tiny, small = 1e-15, 1e-9  # coco's guards against empty corpora, kept for parity
        prod = 1.0
        for k in range(self.n):
            prod *= (float(self.correct[k]) + tiny) / (float(self.guess[k]) + small)
        score = prod ** (1.0 / self.n)
        ratio = (float(self.testlen) + tiny) / (float(self.reflen) + small)
        if ratio < 1:
            score *= math.exp(1 - 1 / ratio)
        return torch.tensor(score)


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


class ExactMatch(_TextMetric):
    """Share of predictions equal to some reference after SQuAD normalisation."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], targets: Targets, options=None) -> None:
        pairs = self._pairs(preds, targets)
        self.correct += sum(any(squad_normalize(p) == squad_normalize(r) for r in refs) for p, refs in pairs)
        self.total += len(pairs)

    def compute(self) -> Tensor:
        return self.correct.float() / self.total.clamp(min=1)
