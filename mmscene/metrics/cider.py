"""CIDEr-D as pycocoevalcap's ``Cider`` (n = 1..4, sigma = 6, x10) on PTB tokens.

The IDF comes from the references of the whole evaluated set, so a rank cannot score its own
share: the tokenised samples are kept as UTF-8 bytes in a ``cat`` list state, gathered from all
ranks, and scored once in ``compute``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics.utilities.data import dim_zero_cat

from mmscene.metrics.text import Targets, _ngrams, _TextMetric
from mmscene.metrics.tokenize import ptb_tokenize

# str.split() treats both as whitespace, so no token can contain them.
_FIELD, _RECORD = "\x1f", "\x1e"


class Cider(_TextMetric):
    """Corpus CIDEr-D of PTB-tokenised answers; targets are one or several references."""

    def __init__(self, n: int = 4, sigma: float = 6.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n, self.sigma = n, sigma
        self.add_state("records", [], dist_reduce_fx="cat")

    def update(self, preds: Sequence[str], targets: Targets, options=None) -> None:
        text = "".join(
            _FIELD.join(" ".join(ptb_tokenize(s)) for s in [pred, *refs]) + _RECORD
            for pred, refs in self._pairs(preds, targets)
        )
        data = np.frombuffer(text.encode(), dtype=np.uint8).copy()
        self.records.append(torch.from_numpy(data).to(self.device))

    def _sync_dist(self, dist_sync_fn=None, process_group=None) -> None:
        # A rank without samples would gather torchmetrics' float32 placeholder against the
        # others' uint8 bytes; give it an empty byte tensor instead.
        if isinstance(self.records, list) and not self.records:
            self.records = [torch.zeros(0, dtype=torch.uint8, device=self.device)]
        kwargs = {"dist_sync_fn": dist_sync_fn} if dist_sync_fn is not None else {}
        super()._sync_dist(process_group=process_group, **kwargs)

    def samples(self) -> list[tuple[str, list[str]]]:
        """The (hypothesis, references) token strings held, in update order."""
        if isinstance(self.records, list) and not self.records:
            return []
        raw = dim_zero_cat(self.records).cpu().numpy().tobytes().decode()
        return [(rec.split(_FIELD)[0], rec.split(_FIELD)[1:]) for rec in raw.split(_RECORD)[:-1]]

    def compute(self) -> Tensor:
        samples = self.samples()
        if not samples:
            return torch.tensor(0.0)
        tests = [_ngrams(hyp.split(), self.n) for hyp, _ in samples]
        crefs = [[_ngrams(r.split(), self.n) for r in refs] for _, refs in samples]
        doc_freq = Counter(gram for refs in crefs for gram in set().union(*refs))
        log_n = math.log(len(crefs))

        def tfidf(counts: Counter) -> tuple[list[dict], list[float], int]:
            vec, norm, length = [{} for _ in range(self.n)], [0.0] * self.n, 0
            for gram, tf in counts.items():
                k = len(gram) - 1
                vec[k][gram] = tf * (log_n - math.log(max(1.0, doc_freq[gram])))
                norm[k] += vec[k][gram] ** 2
                length += tf if k == 1 else 0  # coco counts bigrams as the "length"; kept as is
            return vec, [math.sqrt(x) for x in norm], length

        scores = []
        for test, refs in zip(tests, crefs):
            vec, norm, length = tfidf(test)
            total = 0.0
            for ref in refs:
                vec_r, norm_r, length_r = tfidf(ref)
                penalty = math.exp(-((length - length_r) ** 2) / (2 * self.sigma**2))
                for k in range(self.n):
                    val = sum(min(v, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, v in vec[k].items())
                    if norm[k] != 0 and norm_r[k] != 0:
                        val /= norm[k] * norm_r[k]
                    total += val * penalty
            scores.append(10.0 * total / self.n / len(refs))
        return torch.tensor(sum(scores) / len(scores))
