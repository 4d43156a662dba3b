"""Multiple-choice scoring: option-letter parsing and accuracy, by one of two rules.

``"lmms-eval"`` (the default) is LLaVA-Interleave-Bench's ``mcq_acc`` as lmms-eval applies it
(tasks/llava_interleave_bench/utils.py): both the answer and the reference are reduced by the
same ``process`` and compared; an answer of the form ``"X. text"`` is option X, otherwise the
first stand-alone letter A-E, in either case, of the punctuation-stripped answer, otherwise the
normalised text itself. Scores under this rule are the harness's, so they sit next to
published ones. It is ported here, not imported, because lmms-eval is an optional extra; a test
checks the port against lmms-eval's own function.

``"mmscene"`` is a stricter parser, an explicit option (``model.scoring: mmscene``):

* lmms-eval matches the stand-alone letter case-insensitively, so the article in
  "It is a dog" parses as option A. Here a stand-alone letter must be upper case (lower case is
  accepted only where the whole answer, or its leading marker, is the letter), and a
  sentence-initial article "A red car ..." is not taken for option A.
* Explicit forms ("Answer: C", "(C)") win over an earlier stray capital letter.
* When the options are given, their text is matched before the stand-alone-letter fallback
  ("It is blue." with B = "blue" -> B); lmms-eval instead compares the whole normalised
  answer with the target text, which only helps when targets are not letters.
* The letters are the option keys when options are given (A-E otherwise, as lmms-eval).
* Nothing parseable gives ``None`` (scored wrong and counted), not the raw text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from mmscene.metrics.tokenize import squad_normalize

DEFAULT_LETTERS = "ABCDE"
RULES = ("lmms-eval", "mmscene")

# lmms-eval's mcq_acc, ported line for line (including its quirks: the period rule's lookbehind
# is written ``(?!<=\d)``, and ``re.sub``'s fourth argument is a count).
_H_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_H_COMMA = re.compile(r"(\d)(\,)(\d)")
_H_PUNCT = [
    ";",
    r"/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_H_OPTION = re.compile(r"^([A-E])\.\s*(.+)$", re.IGNORECASE)
_H_LETTER = re.compile(r"\b([A-E])\b", re.IGNORECASE)


def _harness_punctuation(text: str) -> str:
    out = text
    for p in _H_PUNCT:
        if (p + " " in text or " " + p in text) or (re.search(_H_COMMA, text) is not None):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _H_PERIOD.sub("", out, re.UNICODE)


def harness_choice(answer: str) -> str:
    """What lmms-eval's ``mcq_acc`` reduces an answer (or a reference) to: an option letter, or the
    normalised text when no letter stands alone in it."""
    match = _H_OPTION.match(answer.strip())
    if match:
        return match.group(1).upper()
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    text = _harness_punctuation(text)
    text = text.strip("'").strip('"').strip(")").strip("(").strip().lower()
    letter = _H_LETTER.search(text)
    return letter.group(1).upper() if letter else text


def harness_choice_correct(prediction: str, reference: str) -> bool:
    """lmms-eval's ``mcq_acc(reference, prediction) == 1``."""
    return harness_choice(prediction) == harness_choice(reference)


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"scoring rule must be one of {RULES}, got {rule!r}")
    return rule


_WHOLE = re.compile(r"[(\[]?\s*([A-Za-z])\s*[)\]]?\s*[.:)]?")
_LEADING = re.compile(r"[(\[]?([A-Za-z])(?:[)\]]|\s*[.:,)])(?:\s|$)")
_CUE = re.compile(r"\b(?i:answer|option|choice)(?:\s+is)?\s*[:\-]?\s*[(\[]?([A-Z])(?![\w'\-])")
_BRACKETED = re.compile(r"[(\[]([A-Za-z])[)\]]")
_STANDALONE = re.compile(r"(?<![\w'\-])([A-Z])(?![\w'\-])")
_ARTICLE_A = re.compile(r"(?:^|[.!?]\s+)(A)\s+(?!(?:is|was|seems|appears|would|should)\b)[a-z]")


def parse_choice(answer: str, options: Mapping[str, str] | None = None) -> str | None:
    """The option letter a generated answer picks, or ``None`` when none can be read."""
    letters = {k.strip().upper() for k in options} if options else set(DEFAULT_LETTERS)
    text = answer.strip()
    for pattern in (_WHOLE, _LEADING):
        m = pattern.fullmatch(text) if pattern is _WHOLE else pattern.match(text)
        if m and m.group(1).upper() in letters:
            return m.group(1).upper()
    for pattern in (_CUE, _BRACKETED):
        for m in pattern.finditer(text):
            if m.group(1).upper() in letters:
                return m.group(1).upper()
    if options:
        by_text = _match_option_text(text, options)
        if by_text is not None:
            return by_text
    articles = {m.start(1) for m in _ARTICLE_A.finditer(text)}
    for m in _STANDALONE.finditer(text):
        if m.group(1) in letters and m.start() not in articles:
            return m.group(1)
    return None


def _match_option_text(text: str, options: Mapping[str, str]) -> str | None:
    norm = f" {squad_normalize(text)} "
    hits = {}
    for key, value in options.items():
        opt = squad_normalize(str(value))
        if opt and f" {opt} " in norm:
            hits[key.strip().upper()] = opt
    # "dark red" also contains option "red": keep only hits not inside a longer hit.
    best = [k for k, v in hits.items() if not any(v != w and f" {v} " in f" {w} " for w in hits.values())]
    return best[0] if len(best) == 1 else None


class MultipleChoiceAccuracy(Metric):
    """Accuracy of the chosen option under ``rule`` (see the module); unparseable answers count
    as wrong.

    ``compute_unparsed()`` gives how many predictions had no readable option letter (synced over
    ranks); under ``"lmms-eval"`` those still score when their text equals the reference's.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, rule: str = "lmms-eval", **kwargs) -> None:
        super().__init__(**kwargs)
        self.rule = check_rule(rule)
        self.add_state("correct", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("unparsed", torch.tensor(0), dist_reduce_fx="sum")

    def update(
        self,
        preds: Sequence[str],
        targets: Sequence[str],
        options: Sequence[Mapping[str, str] | None] | None = None,
    ) -> None:
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")
        options = list(options) if options is not None else [None] * len(preds)
        correct = unparsed = 0
        if self.rule == "lmms-eval":
            for pred, target in zip(preds, targets):
                guess = harness_choice(pred)
                unparsed += not (len(guess) == 1 and guess in DEFAULT_LETTERS)
                correct += guess == harness_choice(target)
            self._add(correct, len(preds), unparsed)
            return
        for pred, target, opts in zip(preds, targets, options):
            gold = parse_choice(target, opts)
            if gold is None:
                raise ValueError(f"target {target!r} names no option letter")
            guess = parse_choice(pred, opts)
            unparsed += guess is None
            correct += guess == gold
        self._add(correct, len(preds), unparsed)

    def _add(self, correct: int, total: int, unparsed: int) -> None:
        self.correct += correct
        self.total += total
        self.unparsed += unparsed

    def compute(self) -> Tensor:
        return self.correct.float() / self.total.clamp(min=1)

    def compute_unparsed(self) -> Tensor:
        """Number of predictions without a readable option letter, over all ranks."""
        if self._is_synced:
            return self.unparsed.clone()
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync):
            return self.unparsed.clone()
