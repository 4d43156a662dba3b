"""Benchmark scores during ``fit``: lmms-eval tasks on the live model every N optimizer steps.

    trainer:
      callbacks:
        - class_path: mmscene.eval.callback.BenchmarkEval
          init_args: {tasks: [llava_interleave_bench_in_domain], every_n_steps: 2000, limit: 200,
                      include_path: [tasks/]}

Every rank runs its share of the requests (lmms-eval splits them; sharded ranks generate
together); rank 0 logs ``bench/<task>/<metric>`` to the trainer's loggers and appends the scores
to ``bench.jsonl`` in the run's log folder. The tasks are looked up when fitting starts, so a
misspelt task fails the run at once rather than at the first evaluation, hours in.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch

log = logging.getLogger(__name__)


class BenchmarkEval(L.Callback):
    """Args:
    tasks: lmms-eval task or group names.
    every_n_steps: optimizer steps between evaluations (and after the last step of a multiple).
    include_path: folders of local task YAMLs.
    limit: samples per task (all when null).
    batch_size: requests per generation batch and rank.
    max_new_tokens: generation length for tasks that set none.
    multi_view_tasks: tasks whose images are views of one 3D scene (the 3d plugin's handling).
    """

    def __init__(
        self,
        tasks: list[str],
        every_n_steps: int,
        include_path: list[str] | None = None,
        limit: int | None = None,
        batch_size: int = 1,
        max_new_tokens: int = 1024,
        multi_view_tasks: list[str] | None = None,
    ):
        if every_n_steps < 1:
            raise ValueError(f"BenchmarkEval: every_n_steps must be >= 1, got {every_n_steps}")
        if not tasks:
            raise ValueError("BenchmarkEval: no tasks")
        self.tasks, self.every_n_steps = list(tasks), int(every_n_steps)
        self.include_path, self.limit = list(include_path or []), limit
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.multi_view_tasks = tuple(multi_view_tasks or ())
        self._last_step = -1
        self._manager = None

    def on_fit_start(self, trainer, pl_module) -> None:
        from mmscene.eval.harness import find_tasks

        self._manager, missing = find_tasks(self.tasks, self.include_path)  # kept for every evaluation
        if missing:
            raise ValueError(
                f"BenchmarkEval: lmms-eval knows no task {missing} (include_path: {self.include_path})"
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step or step == 0 or step % self.every_n_steps:
            return  # not an optimizer step boundary of a multiple of N (accumulation repeats it)
        self._last_step = step
        scores = self.evaluate(trainer, pl_module)
        out = Path(trainer.log_dir or trainer.default_root_dir)  # every rank asks: it broadcasts
        if trainer.is_global_zero and scores is not None:
            flat = {
                f"bench/{task}/{metric}": v for task, values in scores.items() for metric, v in values.items()
            }
            for logger in trainer.loggers:
                logger.log_metrics(flat, step=step)
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "bench.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "scores": scores}) + "\n")
            log.info("benchmark scores at step %d: %s", step, flat)

    def evaluate(self, trainer, pl_module) -> dict[str, dict[str, float]] | None:
        from mmscene.eval.harness import run_tasks, scores
        from mmscene.eval.lmms_model import MMSceneLMM
        from mmscene.eval.session import DataSettings, EvalSession

        # the data module's prompt settings (training's defaults for a data module of another kind)
        hparams = dict(getattr(trainer.datamodule, "hparams", {}) or {})
        session = EvalSession(
            pl_module.model,
            pl_module.tokenizer,
            DataSettings.of(hparams),
            scenarios=dict(getattr(trainer.datamodule, "scenarios", {}) or {}),
            multi_view_tasks=self.multi_view_tasks,
        )
        lm = MMSceneLMM(session=session, batch_size=self.batch_size, max_new_tokens=self.max_new_tokens)
        was_training = pl_module.model.training
        pl_module.model.eval()
        try:
            with torch.no_grad():
                results = run_tasks(
                    lm,
                    self.tasks,
                    include_path=self.include_path,
                    limit=self.limit,
                    log_samples=False,
                    distributed=trainer.world_size > 1,
                    manager=self._manager,
                )
        finally:
            pl_module.model.train(was_training)
        return scores(results) if results is not None else None
