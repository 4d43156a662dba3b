"""The LightningModule: builds the core lazily, trains it, validates by generating answers."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from mmscene.constants import MODEL_PARTS
from mmscene.metrics import SCORINGS
from mmscene.model import attention
from mmscene.model import lora as lora_adapters
from mmscene.model.core import MultimodalLM
from mmscene.model.token_loss import KERNELS
from mmscene.train import sharding
from mmscene.train.building import build_model, model_config, skeleton
from mmscene.train.evaluation import Scoreboard
from mmscene.train.inputs import core_inputs, generate_answers
from mmscene.train.loss import scale_gradients
from mmscene.train.ranks import concatenated
from mmscene.train.schedule import lr_schedule

log = logging.getLogger(__name__)

_ATTR = {"vision": "vision_tower", "projector": "projector", "llm": "language_model"}
_COMPILE_KEYS = {"mode", "dynamic", "fullgraph", "backend", "options"}
# torch.optim.AdamW's flags per implementation (torchtitan's names)
_OPTIMIZER_IMPLS = {
    "fused": {"fused": True},
    "foreach": {"foreach": True},
    "for-loop": {"foreach": False},
    "auto": {},
}


class MMSceneModule(L.LightningModule):
    """
    Args:
        model: how to build the core: ``{"config": {...MultimodalConfig...}}`` (from scratch),
            ``{"pretrained": path}`` (mmscene / llava-hf / llava_qwen directory), or
            ``{"components": {"vision": path, "llm": path}}`` (fresh projector).
        freeze: parts that are not trained (the paper freezes the vision tower).
        lr: learning rate per part.
        weight_decay: AdamW weight decay (not applied to biases and norms).
        optimizer_impl: AdamW's implementation: ``fused`` (one kernel for all parameters, CPU and
            CUDA), ``foreach``, ``for-loop`` or ``auto`` (fused on CPU and CUDA, else torch's
            default; also torch's default under ``precision: *-mixed`` with gradient clipping,
            which Lightning refuses for a fused optimizer).
        warmup_steps: linear warmup, then cosine decay to ``min_lr_ratio`` at ``trainer.max_steps``.
        max_new_tokens: generation length in validation and prediction.
        activation_checkpointing: recompute each decoder / encoder layer in backward.
        fsdp: FSDP2 options under ModelParallelStrategy (see :mod:`mmscene.train.sharding`).
        attn_implementation: attention kernel of tower and LLM: ``sdpa``, ``sdpa_varlen`` (SDPA
            per sample of a packed row, the CPU's varlen kernel), ``eager``, ``flash_attention_2``,
            ``flex_attention`` or ``auto`` (null; on a GPU flash-attention 2 where installed, else
            SDPA; on a CPU ``sdpa_varlen``, or SDPA under ``compile``). Packed rows never attend
            across samples with any.
        nonfinite_loss: when a step's loss is NaN or infinite: ``stop`` raises, naming the step's
            samples and scenarios on every rank; ``skip`` logs them, drops the step's gradients
            (no parameter or optimizer-state update) and counts it in ``train/nonfinite_steps``.
        loss_kernel: how the token loss is computed from the last hidden states (no full-vocabulary
            logits): ``auto`` (Liger-Kernel's fused linear cross-entropy on CUDA where installed,
            else ``chunked``), ``chunked``, ``liger`` or ``plain`` (see :mod:`mmscene.model.token_loss`).
        loss_chunk_tokens: labelled positions per chunk of the ``chunked`` kernel.
        lora: LoRA adapters through peft instead of full fine-tuning of the LLM: ``{r, alpha,
            dropout, target_modules, tower, tower_target_modules}`` (see :mod:`mmscene.model.lora`);
            the adapted parts train only their adapters, the projector trains as ``freeze`` says,
            and checkpoints hold only what trains.
        compile: ``torch.compile`` each tower and decoder block (true, or torch.compile's
            options: ``{mode, dynamic, fullgraph, backend, options}``); works with FSDP2 and
            activation checkpointing; generation stays eager.
        scoring: rules of the generated-answer scores: ``lmms-eval`` (default; LLaVA-Interleave
            Bench's option and ROUGE-L rules, numbers comparable with published ones) or
            ``mmscene`` (stricter option parser, rouge-score's ROUGE-L); see docs/evaluation.md.

    The loss of an optimizer step is the mean over all labelled tokens of its micro-batches on all
    data-parallel ranks (see :meth:`backward`), and ``train/loss`` logs that same mean.
    """

    def __init__(
        self,
        model: dict[str, Any] | None = None,
        freeze: list[str] | None = None,
        lr: dict[str, float] | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        optimizer_impl: str = "auto",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        max_new_tokens: int = 16,
        activation_checkpointing: bool = False,
        fsdp: dict[str, Any] | None = None,
        attn_implementation: str | None = None,
        nonfinite_loss: str = "stop",
        scoring: str = "lmms-eval",
        loss_kernel: str = "auto",
        loss_chunk_tokens: int = 512,
        compile: bool | dict[str, Any] = False,
        lora: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.spec = model or {"config": {}}
        self.freeze = list(["vision"] if freeze is None else freeze)
        unknown = sorted(set(self.freeze) - set(MODEL_PARTS))
        if unknown:
            raise ValueError(f"freeze: unknown parts {unknown}; choose from {MODEL_PARTS}")
        self.lr = {"vision": 2e-6, "projector": 1e-5, "llm": 1e-5, **(lr or {})}
        unknown = sorted(set(self.lr) - set(MODEL_PARTS))
        if unknown:
            raise ValueError(f"lr: unknown parts {unknown}; choose from {MODEL_PARTS}")
        self.model_config = model_config(self.spec)
        self.lora = lora_adapters.check(lora)
        # a LoRA checkpoint holds only what trains; the base weights come from ``model`` again
        # (a base drawn at random from ``model.config`` stays in)
        self.strict_loading = self.lora is None or "config" in self.spec
        self.attn_implementation = attention.resolve(attn_implementation, compiled=bool(compile))
        self.model: MultimodalLM | None = None
        self.tokenizer = None  # set by the data module
        self.scoreboard: Scoreboard | None = None
        if loss_kernel not in KERNELS:
            raise ValueError(f"loss_kernel: {loss_kernel!r} is not one of {KERNELS}")
        if optimizer_impl not in _OPTIMIZER_IMPLS:
            raise ValueError(f"optimizer_impl: {optimizer_impl!r} is not one of {sorted(_OPTIMIZER_IMPLS)}")
        if loss_chunk_tokens < 1:
            raise ValueError(f"loss_chunk_tokens must be >= 1, got {loss_chunk_tokens}")
        if isinstance(compile, dict) and set(compile) - _COMPILE_KEYS:
            raise ValueError(
                f"compile: unknown keys {sorted(set(compile) - _COMPILE_KEYS)} (torch.compile takes {sorted(_COMPILE_KEYS)})"
            )
        if scoring not in SCORINGS:
            raise ValueError(f"scoring: {scoring!r} is not one of {SCORINGS}")
        if nonfinite_loss not in ("stop", "skip"):
            raise ValueError(f"nonfinite_loss: {nonfinite_loss!r} is not 'stop' or 'skip'")
        self._window = None  # (loss sum, labelled tokens) of the micro-batches of this optimizer step
        self._window_samples: list[tuple[str, str]] = []  # (key, scenario), for a non-finite loss
        self._nonfinite_steps = 0
        # per-scenario [loss sum, tokens] since the last telemetry log, on the device
        self.scenario_names: list[str] | None = None
        self.scenario_loss: torch.Tensor | None = None

    # ------------------------------------------------------------------ building
    def configure_model(self) -> None:
        if self.model is not None:
            return
        if sharding.is_model_parallel(self):
            # Lightning's sharded (DCP) load reads every key of the model: FSDP2 checkpoints keep
            # the frozen base too
            self.strict_loading = True
        if not sharding.is_model_parallel(self):
            self.model = self._prepare(build_model(self.spec, self.model_config, self.attn_implementation))
            return
        # Sharded: only rank 0 builds the full model; every rank shards a meta skeleton (adapters,
        # when LoRA is on, injected into both before fully_shard, as peft + FSDP2 need).
        cfg = self.hparams.fsdp or {}
        self.model = sharding.build_sharded(
            self.global_rank,
            lambda: self._adapt(build_model(self.spec, self.model_config, self.attn_implementation)),
            lambda: self._prepare(skeleton(self.model_config, self.attn_implementation)),
            sharding.mesh_of(self, cfg),
            cfg,
            self.device,
        )

    def _adapt(self, model: MultimodalLM) -> MultimodalLM:
        if self.lora is not None:
            with torch.random.fork_rng(devices=[]):  # the same adapter init wherever it is built
                torch.manual_seed(0)
                lora_adapters.add_adapters(model, self.lora)
        return model

    def _prepare(self, model: MultimodalLM) -> MultimodalLM:
        model = self._adapt(model)
        for part in MODEL_PARTS:
            getattr(model, _ATTR[part]).requires_grad_(part not in self.freeze)
        if self.lora is not None:
            lora_adapters.set_trainable(
                model, self.lora, {_ATTR[p]: p not in self.freeze for p in MODEL_PARTS}
            )
        model.freeze_unused()
        if self.hparams.activation_checkpointing:
            model.language_model.gradient_checkpointing_enable({"use_reentrant": False})
            if hasattr(model.vision_tower, "gradient_checkpointing_enable"):
                model.vision_tower.gradient_checkpointing_enable({"use_reentrant": False})
        if self.hparams.compile:
            model.compile_blocks(**({} if self.hparams.compile is True else self.hparams.compile))
        return model

    def geometry(self, pad_to_square: bool = True):
        from mmscene.data.pipeline.encode import ImageGeometry

        with torch.device("meta"):
            probe = MultimodalLM(self.model_config)
        return ImageGeometry.of(probe, pad_to_square)

    # ------------------------------------------------------------------ training
    def forward(self, batch: dict[str, Any]):
        return self.model(**core_inputs(batch), labels=batch.get("labels"))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        last = not self.trainer.fit_loop._should_accumulate()  # Lightning's own accumulation test
        if sharding.is_model_parallel(self):
            # FSDP2 reduce-scatters only on the last micro-batch of a window (DDP's no_sync).
            self.model.set_requires_gradient_sync(last)
        # the summed token loss from the last hidden states, chunk by chunk (no full logits),
        # with each scenario's share for the telemetry (mmscene.train.telemetry)
        summed = {"kernel": self.hparams.loss_kernel, "chunk_tokens": self.hparams.loss_chunk_tokens}
        summed.update(self._scenario_groups(batch))
        if batch.get("label_positions") is not None:  # the collate's host-side gather index
            summed["positions"] = batch["label_positions"]
        loss_sum, count, *by_scenario = self.model(
            **core_inputs(batch), labels=batch["labels"], summed_loss=summed
        )
        if by_scenario and by_scenario[0] is not None:
            self.scenario_loss = by_scenario[0] + (0 if self.scenario_loss is None else self.scenario_loss)
        done = torch.stack([loss_sum.detach(), count])
        self._window = done if self._window is None else self._window + done
        self._window_samples += [(m["key"], m["scenario"]) for m in batch["meta"]]
        n = batch["input_ids"].shape[0]
        # samples' tokens counted on the host by the collate (row padding excluded; no device sync)
        tokens = batch.get("real_tokens", batch["input_ids"].numel())
        self.log("train/tokens", float(tokens), reduce_fx="sum", batch_size=n)
        # Summed, not averaged: backward() divides the window's gradients by its token count.
        return loss_sum

    def _scenario_groups(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Each position's scenario index (row padding: scenario 0, never labelled)."""
        if self.scenario_names is None or batch.get("sample_index") is None:
            return {}
        index = {name: i for i, name in enumerate(self.scenario_names)}
        of_sample = [index.get(m["scenario"], 0) for m in batch["meta"]] + [0]  # [-1]: padding
        of_sample = torch.tensor(of_sample, dtype=torch.long).to(self.device, non_blocking=True)
        return {"groups": of_sample[batch["sample_index"]], "num_groups": len(self.scenario_names)}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # restored here, not on load: building the data loader's iterator draws from it first
        state, self._rng_to_restore = getattr(self, "_rng_to_restore", None), None
        if state is not None:
            torch.set_rng_state(state["cpu"])
            if "cuda" in state and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda"], self.device)

    def on_fit_start(self) -> None:
        attention.check_trainable(self.attn_implementation, self.device)
        datamodule = getattr(self.trainer, "datamodule", None)
        scenarios = getattr(datamodule, "scenarios", None)
        self.scenario_names = sorted(scenarios) if scenarios else None

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Backward of a micro-batch's summed token loss; on the last micro-batch of an optimizer
        step, the accumulated (and data-parallel averaged) gradients are rescaled so that they are
        the gradient of the mean over every labelled token of the step, on every rank.

        Lightning divides each micro-batch loss by ``accumulate_grad_batches`` (A) and DDP / FSDP2
        average gradients over the D data-parallel ranks, so the gradients hold
        sum-of-token-losses' gradient / (A * D); multiplying by A * D / N, with N the step's
        labelled tokens on all ranks, gives the per-token mean (transformers' ``num_items_in_batch``).
        """
        loss.backward(*args, **kwargs)
        if self.trainer.fit_loop._should_accumulate():
            return
        window, self._window = self._window, None
        group = sharding.data_parallel_group(self)
        if group is not None:
            torch.distributed.all_reduce(window, group=group)
        replicas = 1 if group is None else torch.distributed.get_world_size(group)
        samples, self._window_samples = self._window_samples, []
        loss_total, tokens = window[0], window[1].clamp(min=1)
        self._step_loss = loss_total / tokens
        if not bool(torch.isfinite(loss_total)):  # the same on every rank: the sum was all-reduced
            self._nonfinite(samples, group)
            return
        scale_gradients(self.model.parameters(), self.trainer.accumulate_grad_batches * replicas / tokens)

    def _nonfinite(self, samples: list[tuple[str, str]], group) -> None:
        samples = concatenated(samples, group)
        scenarios = sorted({scenario for _, scenario in samples})
        message = (
            f"non-finite loss ({float(self._step_loss)}) at step {self.global_step}; its samples: "
            f"{[key for key, _ in samples]} (scenarios {scenarios})"
        )
        if self.hparams.nonfinite_loss == "stop":
            raise FloatingPointError(message + "; set model.nonfinite_loss: skip to skip such steps")
        log.warning("%s: step skipped", message)
        for p in self.model.parameters():
            p.grad = None  # AdamW leaves parameters without a gradient (and their state) untouched
        self._nonfinite_steps += 1

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nonfinite_steps"] = self._nonfinite_steps
        # the random state dropout (LoRA's, a model's) draws from: a resume draws the same masks
        checkpoint["rng_state"] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            checkpoint["rng_state"]["cuda"] = torch.cuda.get_rng_state(self.device)
        if not self.strict_loading:
            # adapters and what else trains; the frozen base is read again from `model`'s checkpoint
            trained = self.trained_names()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._nonfinite_steps = int(checkpoint.get("nonfinite_steps", 0))
        self._rng_to_restore = checkpoint.get("rng_state")
        if not self.strict_loading and self.model is not None and "state_dict" in checkpoint:
            missing = sorted(self.trained_names() - set(checkpoint["state_dict"]))
            if missing:
                raise ValueError(f"LoRA checkpoint lacks trained weights: {missing[:5]}")

    def trained_names(self) -> set[str]:
        """State-dict names (``model.…``) of the parameters that train."""
        return {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}

    def on_before_optimizer_step(self, optimizer) -> None:
        self.log("train/loss", self._step_loss, prog_bar=True, batch_size=1, sync_dist=False)
        if self.hparams.nonfinite_loss == "skip":
            self.log("train/nonfinite_steps", float(self._nonfinite_steps), batch_size=1, sync_dist=False)

    def configure_optimizers(self):
        groups = []
        for part in MODEL_PARTS:
            if part in self.freeze:
                continue
            decay, no_decay = [], []
            for name, p in getattr(self.model, _ATTR[part]).named_parameters():
                if p.requires_grad:
                    (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
            lr = self.lr[part]
            groups += [
                {"params": decay, "lr": lr, "weight_decay": self.hparams.weight_decay, "name": part},
                {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{part}_no_decay"},
            ]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ValueError("nothing to train: every part is frozen")
        optimizer = torch.optim.AdamW(groups, betas=tuple(self.hparams.betas), **self._adamw_flags())
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        scheduler = lr_schedule(optimizer, self.hparams.warmup_steps, total, self.hparams.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _adamw_flags(self) -> dict[str, bool]:
        impl = self.hparams.optimizer_impl
        # Lightning's AMP precision refuses to clip a fused optimizer's gradients (it would
        # unscale them itself), so under `precision: *-mixed` with clipping AdamW is not fused
        amp_clipping = isinstance(self.trainer.precision_plugin, MixedPrecision) and bool(
            self.trainer.gradient_clip_val
        )
        if impl == "fused" and amp_clipping:
            raise ValueError(
                f"model.optimizer_impl: fused cannot clip gradients under trainer.precision "
                f"{self.trainer.precision!r} (Lightning's mixed precision refuses a fused optimizer there); "
                "use auto or foreach, drop gradient_clip_val, or compute in bf16 through model.fsdp's param_dtype"
            )
        if impl == "auto" and self.device.type in ("cpu", "cuda") and not amp_clipping:
            impl = "fused"  # per-parameter Python loop and a host read of each step count otherwise
        return _OPTIMIZER_IMPLS[impl]

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self.scoreboard = self._scoreboard("val")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._generate_and_score(batch)

    def on_validation_epoch_end(self) -> None:
        self._publish("val")

    def on_test_epoch_start(self) -> None:
        self.scoreboard = self._scoreboard("test")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._generate_and_score(batch)

    def on_test_epoch_end(self) -> None:
        self._publish("test")

    def _scoreboard(self, stage: str) -> Scoreboard:
        dm = self.trainer.datamodule
        return Scoreboard(
            dm.eval_tasks(stage), dm.scenarios, device=self.device, scoring=self.hparams.scoring
        )

    def _generate_and_score(self, batch: dict[str, Any]) -> None:
        answers = self.generate_answers(batch)
        self.scoreboard.update(batch["meta"], answers, batch.get("pad"), batch.get("skips"))

    def generate_answers(self, batch: dict[str, Any]) -> list[str]:
        distributed = self.trainer.world_size > 1 if self._trainer is not None else False
        return generate_answers(
            self.model, self.tokenizer, batch, max_new_tokens=self.hparams.max_new_tokens, synced=distributed
        )

    def _publish(self, stage: str) -> None:
        from mmscene.train.callbacks import print_skips, scenario_of, summed_over_ranks

        results, predictions = self.scoreboard.compute(self.trainer)
        skipped = summed_over_ranks(self.scoreboard.skipped)
        for name, value in results.items():
            self.log(f"{stage}/{name}", value, rank_zero_only=True, sync_dist=False)
        # ``trainer.log_dir`` broadcasts from rank 0: every rank must ask for it.
        out = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            out.mkdir(parents=True, exist_ok=True)
            record = {"step": self.global_step, "stage": stage, "scores": results, "skipped": skipped}
            print_skips(
                f"skipped {stage} samples (all ranks)", skipped, scenario_of(self.trainer.datamodule, stage)
            )
            with open(out / "results.json", "a") as f:
                f.write(json.dumps(record) + "\n")
            with open(out / "predictions.jsonl", "w") as f:
                for row in predictions:
                    f.write(json.dumps({"step": self.global_step, **row}) + "\n")

    # ------------------------------------------------------------------ prediction
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        answers = self.generate_answers(batch)
        pads = batch.get("pad") or [False] * len(answers)
        return [
            {"id": m["key"], "scenario": m["scenario"], "answer": a}
            for m, a, pad in zip(batch["meta"], answers, pads)
            if not pad
        ]

    def configure_callbacks(self):
        from mmscene.train.callbacks import SkipReport, WritePredictions
        from mmscene.train.telemetry import Telemetry

        callbacks = [WritePredictions(), SkipReport()]
        # Lightning lets these replace the trainer's callbacks of the same type: a Telemetry the
        # config sets up (its options) is kept.
        if not any(isinstance(c, Telemetry) for c in self.trainer.callbacks):
            callbacks.append(Telemetry())
        return callbacks
