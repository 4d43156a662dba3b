"""Generation-based scoring per scenario and task, and the Interleave-Bench-style overall.

The set of (scenario, task, question type) is read from the evaluation shards before the epoch,
identically on every rank, so every rank holds the same metrics in the same order and the
torchmetrics sync inside ``compute()`` never waits on a metric that another rank lacks.
"""

from __future__ import annotations

import math
from typing import Any

from mmscene.registry import get_scenario
from mmscene.train.ranks import concatenated


class Scoreboard:
    def __init__(
        self, tasks: list[tuple[str, str, str]], scenarios: dict[str, Any] | None = None, device=None
    ):
        self.metrics: dict[tuple[str, str, str], dict[str, Any]] = {}
        for scenario, task, qtype in tasks:
            plugin = (scenarios or {}).get(scenario) or get_scenario(scenario)
            self.metrics[(scenario, task, qtype)] = {
                name: m.to(device) if device is not None else m
                for name, m in plugin.metrics(task, qtype).items()
            }
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
        primary: dict[str, list[float]] = {}
        for (scenario, task, _qtype), metrics in self.metrics.items():
            for i, (name, metric) in enumerate(metrics.items()):
                value = float(metric.compute())
                metric.reset()
                results[f"{scenario}/{task}/{name}"] = value
                if i == 0 and not math.isnan(value):  # a task's first metric is its headline score
                    primary.setdefault(scenario, []).append(value)
        for scenario, values in primary.items():
            results[f"{scenario}/overall"] = sum(values) / len(values)
        every = [v for values in primary.values() for v in values]
        if every:
            # LLaVA-Interleave Bench: unweighted mean over task categories.
            results["overall"] = sum(every) / len(every)
        return results, concatenated(self.predictions)
