"""A training run launched by tests/test_distributed.py (one process per run; Lightning starts the ranks).

    python tests/dist_script.py --out DIR --strategy single|ddp|fsdp2 --devices N --steps S --data DIR
        [--mode fixed|stream] [--micro-batch B] [--accumulate A] [--ckpt PATH] [--kill-at K]
        [--validate] [--no-reshard-after-forward] [--freeze-vision]
        [--checkpoint-every N] [--crash STEP:PHASE[:SAVE]]

``fixed``: a fixed list of encoded demo samples read in order (a DistributedSampler splits it), so
any ranks x micro-batch x accumulation with the same product sees the same global batches; the
samples are ordered so that micro-batches hold unequal numbers of labelled tokens.
``stream``: mmscene's own data module (mixer, resumable state, validation sources).

``--ckpt last`` resumes from the newest complete checkpoint (``mmscene.train.resume``).
``--checkpoint-every N`` keeps ``ckpts/last.ckpt`` and the newest ``ckpts/epoch=0-step=S.ckpt``;
``--bench TASKS`` runs the local lmms-eval task ``mm_images`` (tests/lmms_tasks.py) after every
optimizer step (BenchmarkEval; scores in ``bench.jsonl``). ``--crash`` SIGKILLs every rank at optimizer step STEP: ``step`` as it starts, ``written`` once
save SAVE (0: the step checkpoint, 1: ``last.ckpt``) is written but not renamed, ``swap`` after
the old ``last.ckpt`` was moved aside and before the new one is renamed in, ``remove`` halfway
through deleting the previous step checkpoint.

Writes ``steps.jsonl`` (per optimizer step: logged train/loss, sample keys, labelled tokens per
micro-batch and rank), ``grads.pt`` (full gradients of the first step), ``weights.pt`` (final).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch.utils.data import DataLoader
from train_helpers import KillAt, tiny_config

from mmscene.data.pipeline.collate import pad_collate
from mmscene.data.pipeline.eval_samples import EvalSamples
from mmscene.data.pipeline.mixer import Source
from mmscene.train.datamodule import MMSceneDataModule, load_tokenizer
from mmscene.train.module import MMSceneModule
from mmscene.train.ranks import from_all_ranks
from mmscene.train.telemetry import Telemetry
from mmscene.train.trainer import MMSceneTrainer

SCENARIOS = ("single_image", "multi_image", "video", "3d")
GLOBAL_BATCH = 8


class FixedSamples(L.LightningDataModule):
    def __init__(self, data: Path, batch_size: int, options: dict):
        super().__init__()
        self.data, self.batch_size, self.options = data, batch_size, options

    def setup(self, stage=None):
        from mmscene.data.pipeline.encode import PromptEncoder
        from mmscene.registry import get_scenario

        tok = load_tokenizer(str(self.data / "tokenizer"))
        module = self.trainer.lightning_module
        module.tokenizer = tok
        encoder = PromptEncoder(tok, module.geometry())
        sources = [Source(shards=str(self.data / "train" / s), scenario=s) for s in SCENARIOS]
        scenarios = {s: get_scenario(s, **self.options.get(s, {})) for s in SCENARIOS}
        self.scenarios = scenarios  # the module's per-scenario loss reads the names
        samples = list(EvalSamples(sources, scenarios, encoder.encode))[:64]
        # Demo answers are all one letter; give sample i a longer answer (the i*5 % 23 prompt
        # tokens before it also labelled) so that micro-batches and ranks hold very different
        # labelled-token counts, the case a mean of per-micro-batch means gets wrong.
        for i, s in enumerate(samples):
            start = int((s["labels"] != -100).nonzero()[0])
            extra = (i * 5) % 23
            s["labels"][start - extra : start] = s["input_ids"][start - extra : start]
        self.samples = samples
        self.pad_id = tok.pad_token_id

    def train_dataloader(self):
        from torch.utils.data.distributed import DistributedSampler

        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(self.samples, world, rank, shuffle=False) if world > 1 else None
        return DataLoader(
            self.samples,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=partial(pad_collate, pad_id=self.pad_id),
        )


class Record(L.Callback):
    """Per optimizer step: the logged loss, keys and label counts; first-step gradients; final weights."""

    def __init__(self, out: Path):
        self.out = out
        self.keys: list[str] = []
        self.labels: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys += [m["key"] for m in batch["meta"]]
        self.labels.append(int((batch["labels"][:, 1:] != -100).sum()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step != 0:
            return
        grads = {}
        for name, p in pl_module.model.named_parameters():
            if p.grad is not None:
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                grads[name] = g.detach().cpu().clone()
        if trainer.is_global_zero:
            torch.save(grads, self.out / "grads.pt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        keys, labels = from_all_ranks(self.keys), from_all_ranks(self.labels)
        self.keys, self.labels = [], []
        loss = float(trainer.callback_metrics["train/loss"])
        if trainer.is_global_zero:
            row = {
                "step": trainer.global_step - 1,
                "loss": loss,
                "keys": [k for part in keys for k in part],
                "labels": labels,
            }
            with open(self.out / "steps.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def on_train_end(self, trainer, pl_module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            pl_module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if trainer.is_global_zero:
            torch.save({k: v.clone() for k, v in state.items()}, self.out / "weights.pt")
            (telemetry,) = [c for c in trainer.callbacks if isinstance(c, Telemetry)]
            (self.out / "telemetry.json").write_text(json.dumps(telemetry.history))
            from torch._dynamo.utils import counters

            (self.out / "compiled.json").write_text(json.dumps(dict(counters["stats"])))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--strategy", choices=["single", "ddp", "fsdp2"], required=True)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--mode", choices=["fixed", "stream"], default="fixed")
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--kill-at", type=int, default=None)
    p.add_argument("--validate", action="store_true", help="validate (generate) after the last step")
    p.add_argument("--no-reshard-after-forward", action="store_true")
    p.add_argument("--freeze-vision", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile every block")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--lora", action="store_true", help="LoRA adapters on the LLM (peft)")
    p.add_argument("--pretrained", default=None, help="start from this checkpoint directory")
    p.add_argument("--probe-loading", action="store_true", help="record how each rank built the model")
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--crash", default=None, help="STEP:PHASE[:SAVE], see the module docstring")
    p.add_argument(
        "--bench", type=Path, default=None, help="folder of local lmms-eval tasks: run mm_images every step"
    )
    p.add_argument("--bench-limit", type=int, default=None)
    return p.parse_args()


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class Crash(L.Callback):
    """SIGKILLs this rank at a chosen point of optimizer step ``step`` (every rank runs one)."""

    def __init__(self, spec: str):
        import mmscene.train.atomic as atomic

        step, self.phase, *save = spec.split(":")
        self.step, self.save = int(step), int(save[0]) if save else 1
        self.saves = 0  # saves at this step so far
        self.armed = self.removing = False
        publish, move_aside = MMSceneTrainer._publish, atomic.move_aside
        remove, delete = atomic.remove, atomic.delete
        save_checkpoint = MMSceneTrainer.save_checkpoint
        crash = self

        def counted_save(trainer, *args, **kwargs):
            if trainer.global_step == crash.step:
                n, crash.saves = crash.saves, crash.saves + 1
                # Rank 0 alone renames and deletes, and dies there; the others then fail in
                # their next collective (had they died first, Lightning's launcher would kill
                # rank 0 before it got there).
                crash.armed = crash.phase == "swap" and n == 1
            return save_checkpoint(trainer, *args, **kwargs)

        def publish_or_die(trainer, partial, final):
            if (
                crash.phase == "written"
                and trainer.global_step == crash.step
                and crash.saves - 1 == crash.save
            ):
                _die()
            return publish(trainer, partial, final)

        def move_aside_and_die(path):
            aside = move_aside(path)
            if crash.armed and aside is not None:
                _die()
            return aside

        def remove_flagged(path):
            crash.removing = crash.phase == "remove" and crash.saves == 1
            try:
                return remove(path)
            finally:
                crash.removing = False

        def delete_and_die(path):
            if crash.removing and path.name.startswith(atomic.REMOVING) and path.exists():
                _die()  # renamed, not yet deleted
            return delete(path)

        MMSceneTrainer.save_checkpoint, MMSceneTrainer._publish = counted_save, publish_or_die
        atomic.move_aside, atomic.delete = move_aside_and_die, delete_and_die
        atomic.remove = remove_flagged

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.phase == "step" and trainer.global_step >= self.step:
            _die()


class ProbeLoading(L.Callback):
    """Per rank: how often the full model was built, whether the parameters were still on meta
    when the weights were distributed, and the weights training starts from."""

    def __init__(self, out: Path):
        import mmscene.train.module as module
        import mmscene.train.sharding as sharding

        self.out, self.record = out, {"full_builds": 0, "meta_before_load": []}
        build, load = module.build_model, sharding.load_into_shards

        def counted_build(*args, **kwargs):
            self.record["full_builds"] += 1
            return build(*args, **kwargs)

        def checked_load(model, full_state, device):
            self.record["meta_before_load"].append(all(p.is_meta for p in model.parameters()))
            return load(model, full_state, device)

        module.build_model, sharding.load_into_shards = counted_build, checked_load

    def on_train_start(self, trainer, pl_module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        (self.out / f"loading-rank{trainer.global_rank}.json").write_text(json.dumps(self.record))
        state = get_model_state_dict(
            pl_module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if trainer.is_global_zero:
            torch.save({k: v.clone() for k, v in state.items()}, self.out / "initial.pt")


def main() -> None:
    args = parse()
    handler = logging.StreamHandler()  # mmscene's log lines (which checkpoint resume took) on stderr
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("mmscene").addHandler(handler)
    logging.getLogger("mmscene").setLevel(logging.INFO)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    random.seed(0)
    cfg = tiny_config(args.data, args.out)
    # Untied embeddings: FSDP2 then shards the embedding and LM head as units of their own.
    cfg["model"]["model"]["config"]["text"]["tie_word_embeddings"] = False
    m, d = cfg["model"], cfg["data"]
    fsdp = {"reshard_after_forward": not args.no_reshard_after_forward}
    module = MMSceneModule(
        model={"pretrained": args.pretrained} if args.pretrained else m["model"],
        freeze=["vision"] if args.freeze_vision else m["freeze"],
        lr=m["lr"],
        warmup_steps=2,
        max_new_tokens=3,
        fsdp=fsdp,
        compile=args.compile,
        activation_checkpointing=args.checkpointing,
        lora={"r": 4, "alpha": 8, "dropout": 0.0} if args.lora else None,  # no dropout: ranks agree
    )
    micro = GLOBAL_BATCH // (args.devices * args.accumulate)
    if args.mode == "fixed":
        datamodule = FixedSamples(args.data, micro, d["scenarios"])
    else:
        datamodule = MMSceneDataModule(
            tokenizer=d["tokenizer"],
            train=d["train"],
            val=d["val"] if args.validate else None,
            scenarios=d["scenarios"],
            batch_size=micro,
            eval_batch_size=8,
            num_workers=1,
            max_length=d["max_length"],
            seed=0,
        )
    if args.strategy == "fsdp2":
        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    elif args.strategy == "ddp":
        strategy = DDPStrategy(process_group_backend="gloo")
    else:
        strategy = "auto"
    callbacks = [Record(args.out)] + ([ProbeLoading(args.out)] if args.probe_loading else [])
    if args.checkpoint_every:
        callbacks.append(
            L.pytorch.callbacks.ModelCheckpoint(
                dirpath=args.out / "ckpts", every_n_train_steps=args.checkpoint_every, save_last=True
            )
        )
    if args.crash:
        callbacks.append(Crash(args.crash))
    if args.bench:
        from mmscene.eval.callback import BenchmarkEval

        callbacks.append(
            BenchmarkEval(
                ["mm_images"], every_n_steps=1, include_path=[str(args.bench)], limit=args.bench_limit
            )
        )
    if args.kill_at:
        callbacks.append(
            L.pytorch.callbacks.ModelCheckpoint(
                dirpath=args.out / "ckpts", every_n_train_steps=args.kill_at - 1, save_top_k=-1
            )
        )
        callbacks.append(KillAt(args.kill_at))
    trainer = MMSceneTrainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_steps=args.steps,
        accumulate_grad_batches=args.accumulate,
        logger=False,
        log_every_n_steps=1,  # the telemetry's window: one optimizer step
        enable_checkpointing=bool(args.kill_at or args.checkpoint_every),
        enable_progress_bar=False,
        callbacks=callbacks,
        limit_val_batches=None if args.validate else 0,
        val_check_interval=args.steps * args.accumulate if args.validate else None,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        default_root_dir=str(args.out),
        use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=args.ckpt)
    if args.validate:  # the other generating stages, on the same sharded weights
        trainer.test(module, datamodule=_eval_datamodule(args, d, test=d["val"]))
        trainer.predict(
            module, datamodule=_eval_datamodule(args, d, predict=_prompts(args)), return_predictions=False
        )


def _eval_datamodule(args, d: dict, **kwargs) -> MMSceneDataModule:
    return MMSceneDataModule(
        tokenizer=d["tokenizer"],
        scenarios=d["scenarios"],
        eval_batch_size=8,
        max_length=d["max_length"],
        predict_media_root=str(args.data / "raw" / "media"),
        predict_output=str(args.out / "answers.jsonl"),
        **kwargs,
    )


def _prompts(args) -> str:
    """The demo validation questions as ``mmscene predict`` prompts (media paths, no answers)."""
    rows = []
    for line in (args.data / "raw" / "val.jsonl").read_text().splitlines():
        r = json.loads(line)
        row = {k: r[k] for k in ("id", "image", "video", "mesh") if k in r}
        rows.append({**row, "prompt": r["conversations"][0]["value"]})
    path = args.out / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


if __name__ == "__main__":
    from mmscene.train.cli import release_process_group

    try:
        main()
    finally:
        release_process_group()
