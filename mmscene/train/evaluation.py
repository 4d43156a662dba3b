"""Generation-based scoring per scenario and task, and the Interleave-Bench overall.

The set of (scenario, task, question type) is read from the evaluation shards before the epoch,
identically on every rank, so every rank holds the same metrics in the same order and the
torchmetrics sync inside ``compute()`` never waits on a metric that another rank lacks.

Overalls are lmms-eval's ``overall_score``: a task's headline (its first metric) is weighted by
its sample count within its bench category (:mod:`mmscene.metrics.interleave_bench`; a task
outside the bench is its own category), and categories are averaged unweighted.
"""

from __future__ import annotations

import math
from typing import Any

from torchmetrics.aggregation import SumMetric

from mmscene.metrics import category_of, use_scoring
from mmscene.registry import get_scenario
from mmscene.train.ranks import concatenated


class Scoreboard:
    def __init__(
        self,
        tasks: list[tuple[str, str, str]],
        scenarios: dict[str, Any] | None = None,
        device=None,
        scoring: str = "lmms-eval",
    ):
        self.metrics: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.counts: dict[tuple[str, str, str], SumMetric] = {}
        for scenario, task, qtype in tasks:
            plugin = (scenarios or {}).get(scenario) or get_scenario(scenario)
            metrics = plugin.metrics(task, qtype)
            if scoring != "lmms-eval":  # the plugin's own choice stands under the default
                use_scoring(metrics, scoring)
            self.metrics[(scenario, task, qtype)] = {
                name: m.to(device) if device is not None else m for name, m in metrics.items()
            }
            count = SumMetric(nan_strategy="error")
            self.counts[(scenario, task, qtype)] = count.to(device) if device is not None else count
        self.predictions: list[dict[str, Any]] = []
        self.skipped: dict[str, int] = {}  # this rank's skipped samples, ``source/reason``

    def update(self, meta: list[dict[str, Any]], answers: list[str], pad=None, skips=None) -> None:
        for key, n in (skips or {}).items():
            self.skipped[key] = self.skipped.get(key, 0) + n
        for i, (m, answer) in enumerate(zip(meta, answers)):
            if pad is not None and bool(pad[i]):
                continue
            key = (m["scenario"], m["task"], m["question_type"])
            if key not in self.metrics:
                raise KeyError(f"sample {m['key']} has task {key} that the evaluation scan did not find")
            options = [m.get("options")]
            for metric in self.metrics[key].values():
                metric.update([answer], [m["answer"]], options)
            self.counts[key].update(1.0)
            self.predictions.append(
                {
                    **{k: m[k] for k in ("key", "scenario", "task", "question_type")},
                    "prediction": answer,
                    "answer": m["answer"],
                    **({"options": m["options"]} if m.get("options") else {}),
                }
            )

    def compute(self, trainer=None) -> tuple[dict[str, float], list[dict[str, Any]]]:
        results: dict[str, float] = {}
        # (scenario, headline, samples, category) per scored task
        headlines: list[tuple[str, float, float, tuple[str, ...]]] = []
        for key, metrics in self.metrics.items():
            scenario, task, _qtype = key
            n = float(self.counts[key].compute())
            self.counts[key].reset()
            for i, (name, metric) in enumerate(metrics.items()):
                value = float(metric.compute())
                metric.reset()
                results[f"{scenario}/{task}/{name}"] = value
                if i == 0 and n > 0 and not math.isnan(value):  # a task's first metric is its headline
                    bench = category_of(task)
                    headlines.append((scenario, value, n, (bench,) if bench else (scenario, task)))
        for scenario in dict.fromkeys(h[0] for h in headlines):
            results[f"{scenario}/overall"] = _category_mean([h for h in headlines if h[0] == scenario])
        if headlines:
            results["overall"] = _category_mean(headlines)
        return results, concatenated(self.predictions)


def _category_mean(headlines: list[tuple[str, float, float, tuple[str, ...]]]) -> float:
    """lmms-eval's overall_score from per-task means: sample-weighted within a category,
    unweighted over categories."""
    sums: dict[tuple[str, ...], list[float]] = {}
    for _, value, n, category in headlines:
        total = sums.setdefault(category, [0.0, 0.0])
        total[0] += value * n
        total[1] += n
    return sum(s / n for s, n in sums.values()) / len(sums)
