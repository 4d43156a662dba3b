"""Text normalisation shared by the text metrics.

* :func:`ptb_tokenize` approximates what coco-caption does before BLEU/CIDEr: Stanford
  PTBTokenizer 3.4.1 with ``-lowerCase``, then dropping the punctuation tokens in
  ``pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS``. It runs without Java; the tests check
  it token-for-token against the real tokenizer where Java is available. Known differences:
  ``@handle`` becomes ``@ handle`` (PTB keeps it whole) and ``rock'n'roll`` stays whole.
* :func:`rouge_tokenize` is rouge-score's tokeniser (no stemming).
* :func:`squad_normalize` is the SQuAD answer normalisation used by exact match.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

# coco-caption's PUNCTUATIONS plus the raw characters that PTB rewrites into one of them
# (quotes become `` '' ` ', dashes --, the ellipsis ...).
_DROP = frozenset(["''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"])
_DROP |= frozenset(['"', "\u201c", "\u201d", "\u2018", "\u2014", "\u2013", "\u2026"])
# PTB writes brackets as -LRB- etc.; coco lowercases first, so its filter (upper case) misses
# them and they stay in the token stream. Kept for parity with published numbers.
_BRACKETS = str.maketrans(
    {"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ", "{": " -lcb- ", "}": " -rcb- "}
)
_ABBREV = "mr|mrs|ms|dr|prof|st|jr|sr|vs|etc|inc|ltd|co|corp"
_TOKEN = re.compile(
    r"-(?:lrb|rrb|lsb|rsb|lcb|rcb)-"
    r"|n't|'(?:s|m|d|ll|re|ve)(?!\w)"  # clitics, split off below
    rf"|(?:{_ABBREV})\.(?!\w)|no\.(?=\s*\d)"  # abbreviations keep their period
    r"|[^\W\d_]+(?:\.[^\W\d_]+)+\.?|[^\W\d_]\.(?!\w)"  # u.s., e.g., initials "b."
    r"|(?<!\w)-?\d+(?:[.,:]\d+)+|(?<!\w)-\d+"  # 3.5 1,000 10:30 -5
    r"|\w+(?:[-/'&]\w+)*"  # words, red-haired, left/right, o'clock, at&t
    r"|\.\.\.|--|[?!]{2,}|\S"
)
_SPLITS = [
    (re.compile(r"(\w)(n't)\b"), r"\1 \2"),  # don't -> do n't, can't -> ca n't
    (re.compile(r"(\w)('(?:s|m|d|ll|re|ve))\b"), r"\1 \2"),
    (re.compile(r"\bcannot\b"), "can not"),
    (re.compile(r"\b(gon|wan)(na)\b"), r"\1 \2"),
    (re.compile(r"\b(got)(ta)\b"), r"\1 \2"),
]


def ptb_tokenize(text: str) -> list[str]:
    """Lower-cased PTB-style tokens with coco-caption's punctuation removed."""
    text = text.lower().replace("\u2019", "'").translate(_BRACKETS)
    for pattern, repl in _SPLITS:
        text = pattern.sub(repl, text)
    return [tok for tok in _TOKEN.findall(text) if tok not in _DROP]


_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokenize(text: str) -> list[str]:
    """rouge-score's default tokeniser: lower case, ASCII letters and digits only."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = frozenset(string.punctuation)


def squad_normalize(text: str) -> str:
    """SQuAD v1.1 ``normalize_answer``: lower, drop punctuation, articles, extra whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def reference_lists(targets: Sequence[str | Sequence[str]]) -> list[list[str]]:
    """Each target as a list of references (a bare string is one reference)."""
    refs = [[t] if isinstance(t, str) else list(t) for t in targets]
    if any(not r for r in refs):
        raise ValueError("every target needs at least one reference")
    return refs
