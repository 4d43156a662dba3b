"""Training telemetry: throughput, MFU (two counts), learning rates, gradient norm, per-scenario
loss, padding efficiency and data-loader wait, logged every ``trainer.log_every_n_steps``
optimizer steps.

Nothing here synchronises the host with the device between logs: the counts come from the
collate (host integers, see :func:`mmscene.data.pipeline.collate.training_counts`), times from
the host clock, and the per-scenario loss sums stay on the device until a log step. A log step
does one all-reduce of one small tensor (totals over data-parallel ranks) and, on a GPU, one
synchronize so that its wall time covers the work queued in the window. Values go to the
trainer's loggers directly (as Lightning's ``LearningRateMonitor`` does), under ``train/``.

Logged: ``tokens_per_s`` (samples' tokens, row padding excluded, all ranks), ``samples_per_s``,
``tflops_lm`` / ``tflops_with_vit`` (achieved per device, the two counts of
:mod:`mmscene.model.flops`) and ``mfu_lm`` / ``mfu_with_vit`` (over ``peak_flops`` per device),
``lr/<part>``, ``grad_norm`` (total L2 norm before clipping), ``loss/<scenario>`` (per-token
mean over the window), ``padding_efficiency`` (samples' tokens / row slots) and ``loader_wait``
(share of the window's wall time spent waiting for the next batch), ``pretokenized`` (share of
samples whose ids came from their shard's stored form, :mod:`mmscene.data.pipeline.pretokenized`).
"""

from __future__ import annotations

import functools
import logging
import time

import lightning as L
import torch

from mmscene.model.flops import FlopCounts

log = logging.getLogger(__name__)

_COUNTERS = ("tokens", "samples", "slots", "flops_lm", "flops_vit", "wait", "pretokenized")


class Telemetry(L.Callback):
    """
    Args:
        peak_flops: peak FLOP/s of one device for the MFU: ``auto`` (the GPU's datasheet figure
            for the training dtype, from Lightning's table; on CPU the matmul rate this process
            measures at the start, named ``measured`` in the log), a number, or null (no MFU).
        grad_norm: log the gradient norm (one extra reduction over shards per log step).
    """

    def __init__(self, peak_flops: float | str | None = "auto", grad_norm: bool = True):
        if not (peak_flops is None or peak_flops == "auto" or float(peak_flops) > 0):
            raise ValueError(f"peak_flops must be 'auto', a positive number or null, got {peak_flops!r}")
        self.peak_flops = peak_flops
        self.grad_norm = grad_norm
        self._peak: float | None = None
        self._counts: FlopCounts | None = None
        self.history: list[tuple[int, dict[str, float]]] = []  # (step, metrics) on every rank

    # ------------------------------------------------------------------ set-up
    def on_train_start(self, trainer, pl_module) -> None:
        self._counts = FlopCounts.of(pl_module.model)
        self._peak = self._device_peak(trainer, pl_module)
        self._reset(time.perf_counter())
        self._last_end: float | None = None

    def _device_peak(self, trainer, pl_module) -> float | None:
        if self.peak_flops is None:
            return None
        if self.peak_flops != "auto":
            return float(self.peak_flops)
        dtype = _training_dtype(trainer, pl_module)
        device = pl_module.device
        if device.type == "cpu":
            peak = measured_matmul_flops(dtype)
            log.info("MFU on CPU is against the measured matmul rate: %.3g FLOP/s", peak)
            return peak
        from lightning.fabric.utilities.throughput import get_available_flops

        peak = get_available_flops(device, dtype)
        return None if peak is None else float(peak)

    # A validation inside the window is neither training time nor data wait.
    def on_validation_start(self, trainer, pl_module) -> None:
        self._paused_at = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        paused_at = getattr(self, "_paused_at", None)
        if paused_at is None or not hasattr(self, "_window_start"):
            return
        pause = time.perf_counter() - paused_at
        self._window_start += pause
        if self._last_end is not None:
            self._last_end += pause
        self._paused_at = None

    def _reset(self, now: float) -> None:
        self._window_start = now
        self._totals = dict.fromkeys(_COUNTERS, 0.0)
        self._grad_norm: torch.Tensor | None = None

    # ------------------------------------------------------------------ per batch (host only)
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last_end is not None:
            self._totals["wait"] += now - self._last_end
        lengths = batch.get("sample_lengths") or [int(batch["input_ids"].shape[1])] * len(batch["meta"])
        images = int(batch["pixel_values"].shape[0])
        pooled = int(batch.get("pooled_images", 0))
        model = pl_module.model
        positions = batch.get("image_positions")  # the encoder's count (AnyRes images vary)
        if positions is None:
            single = (images - pooled) * model.tokens_per_image()
            positions = single + pooled * model.tokens_per_image(pooled=True)
        t = self._totals
        t["tokens"] += sum(lengths)
        t["samples"] += len(lengths)
        t["slots"] += int(batch["input_ids"].numel())
        t["pretokenized"] += int(batch.get("pretokenized", 0))
        t["flops_lm"] += self._counts.lm(lengths)
        t["flops_vit"] += self._counts.with_vit(lengths, images, positions)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.grad_norm and self._log_step(trainer, offset=1):
            grads = [p.grad for p in pl_module.model.parameters() if p.grad is not None]
            if grads:
                norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
                self._grad_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._last_end = time.perf_counter()
        if trainer.fit_loop._should_accumulate() or not self._log_step(trainer):
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # the window's queued work is in its wall time
        now = time.perf_counter()
        metrics = self._window_metrics(trainer, pl_module, optimizer=trainer.optimizers[0], now=now)
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        self.history.append((step, metrics))
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        self._reset(time.perf_counter())
        self._last_end = self._window_start

    @staticmethod
    def _log_step(trainer, offset: int = 0) -> bool:
        """Whether the optimizer step just taken (offset 1: about to be taken) is a log step."""
        return (trainer.global_step + offset) % max(1, trainer.log_every_n_steps) == 0

    # ------------------------------------------------------------------ per log step
    def _window_metrics(self, trainer, pl_module, optimizer, now: float) -> dict[str, float]:
        seconds = max(now - self._window_start, 1e-9)
        names = pl_module.scenario_names or []
        scenario = pl_module.scenario_loss
        local = [self._totals[k] for k in _COUNTERS]
        packed = torch.tensor(local, dtype=torch.float64, device=pl_module.device)
        if scenario is not None:
            packed = torch.cat([packed, scenario.to(torch.float64).flatten()])
        world = trainer.world_size
        if world > 1:
            torch.distributed.all_reduce(packed)  # totals over ranks; loss sums over DP ranks
        values = packed.tolist()
        total = dict(zip(_COUNTERS, values))
        metrics = {
            "train/tokens_per_s": total["tokens"] / seconds,
            "train/samples_per_s": total["samples"] / seconds,
            "train/padding_efficiency": total["tokens"] / max(total["slots"], 1.0),
            "train/loader_wait": total["wait"] / world / seconds,
            "train/pretokenized": total["pretokenized"] / max(total["samples"], 1.0),
        }
        for name, key in (("lm", "flops_lm"), ("with_vit", "flops_vit")):
            per_device = total[key] / world / seconds
            metrics[f"train/tflops_{name}"] = per_device / 1e12
            if self._peak:
                metrics[f"train/mfu_{name}"] = per_device / self._peak
        for group in optimizer.param_groups:
            name = str(group.get("name", "group"))
            if not name.endswith("_no_decay"):
                metrics[f"train/lr/{name}"] = float(group["lr"])
        if self._grad_norm is not None:
            metrics["train/grad_norm"] = float(self._grad_norm)
        if scenario is not None:
            sums = values[len(_COUNTERS) :]
            for i, name in enumerate(names):
                loss, count = sums[2 * i], sums[2 * i + 1]
                if count:
                    metrics[f"train/loss/{name}"] = loss / count
            pl_module.scenario_loss = None
        return metrics


def _training_dtype(trainer, pl_module) -> torch.dtype:
    precision = str(trainer.precision)
    if "bf16" in precision:
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return next(pl_module.model.parameters()).dtype


@functools.cache
def measured_matmul_flops(dtype: torch.dtype, size: int = 512, seconds: float = 0.2) -> float:
    """FLOP/s of square matmuls on this CPU with the current thread count (a measured, not a
    datasheet, peak: the honest denominator for an MFU on a laptop)."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / elapsed
