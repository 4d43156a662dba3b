"""A training run launched by tests/test_distributed.py, once per strategy.

    python tests/dist_script.py OUT_DIR STRATEGY DEVICES MAX_STEPS DATA_DIR [fixed|stream] [CKPT] [KILL_AT]

``fixed``: a fixed list of encoded demo samples read in order (Lightning inserts a
DistributedSampler), so 1 rank x batch 8 and 2 ranks x batch 4 see the same global batches.
``stream``: mmscene's own data module (mixer, resumable state).
"""

from __future__ import annotations

import json
import random
import sys
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch.utils.data import DataLoader
from train_helpers import KillAt, tiny_config

from mmscene.data.collate import pad_collate
from mmscene.data.mixer import EvalSamples, Source
from mmscene.train.datamodule import MMSceneDataModule, load_tokenizer
from mmscene.train.module import MMSceneModule

SCENARIOS = ("single_image", "multi_image", "video", "3d")


class FixedSamples(L.LightningDataModule):
    def __init__(self, data: Path, batch_size: int, options: dict):
        super().__init__()
        self.data, self.batch_size, self.options = data, batch_size, options

    def setup(self, stage=None):
        from mmscene.data.encode import PromptEncoder
        from mmscene.registry import get_scenario

        tok = load_tokenizer(str(self.data / "tokenizer"))
        module = self.trainer.lightning_module
        module.tokenizer = tok
        encoder = PromptEncoder(tok, module.geometry())
        sources = [Source(shards=str(self.data / "train" / s), scenario=s) for s in SCENARIOS]
        scenarios = {s: get_scenario(s, **self.options.get(s, {})) for s in SCENARIOS}
        samples = list(EvalSamples(sources, scenarios, encoder.encode))
        # Equal label counts per sample make the per-rank mean equal the global token mean.
        self.samples = [s for s in samples if int((s["labels"] != -100).sum()) == 2][:64]
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
    """Global mean loss per step and the final full weights (rank 0 writes)."""

    def __init__(self, out: Path):
        self.out = out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"].detach().clone()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(loss)
            loss /= torch.distributed.get_world_size()
        keys = [m["key"] for m in batch["meta"]]
        if torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, keys)
            keys = [k for part in gathered for k in part]
        if trainer.is_global_zero:
            with open(self.out / "steps.jsonl", "a") as f:
                f.write(
                    json.dumps({"step": trainer.global_step - 1, "loss": loss.item(), "keys": keys}) + "\n"
                )

    def on_train_end(self, trainer, pl_module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            pl_module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if trainer.is_global_zero:
            torch.save({k: v.clone() for k, v in state.items()}, self.out / "weights.pt")


def main() -> None:
    out, strategy, devices, max_steps, data = sys.argv[1:6]
    mode = sys.argv[6] if len(sys.argv) > 6 else "fixed"
    ckpt = sys.argv[7] if len(sys.argv) > 7 and sys.argv[7] != "-" else None
    kill_at = int(sys.argv[8]) if len(sys.argv) > 8 else None
    out, data, devices = Path(out), Path(data), int(devices)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    random.seed(0)
    cfg = tiny_config(data, out)
    # Untied embeddings: FSDP2 then shards the embedding and LM head as units of their own.
    cfg["model"]["model"]["config"]["text"]["tie_word_embeddings"] = False
    m = cfg["model"]
    module = MMSceneModule(model=m["model"], freeze=m["freeze"], lr=m["lr"], warmup_steps=2, max_new_tokens=2)
    d = cfg["data"]
    global_batch = 8
    if mode == "fixed":
        datamodule = FixedSamples(data, global_batch // devices, d["scenarios"])
    else:
        datamodule = MMSceneDataModule(
            tokenizer=d["tokenizer"],
            train=d["train"],
            scenarios=d["scenarios"],
            batch_size=global_batch // devices,
            num_workers=1,
            max_length=d["max_length"],
            seed=0,
        )
    if strategy == "fsdp2":
        strat = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    elif strategy == "ddp":
        strat = DDPStrategy(process_group_backend="gloo")
    else:
        strat = "auto"
    callbacks = [Record(out)]
    if kill_at:
        callbacks.append(
            L.pytorch.callbacks.ModelCheckpoint(
                dirpath=out / "ckpts", every_n_train_steps=kill_at - 1, save_top_k=-1
            )
        )
        callbacks.append(KillAt(kill_at))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strat,
        max_steps=int(max_steps),
        logger=False,
        enable_checkpointing=bool(kill_at),
        enable_progress_bar=False,
        callbacks=callbacks,
        limit_val_batches=0,
        default_root_dir=str(out),
        use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)


if __name__ == "__main__":
    main()
