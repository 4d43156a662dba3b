"""The LightningDataModule: sources → plugins → prompt encoder → mixed, resumable batches."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch.distributed as dist
from torch.utils.data import DataLoader

from mmscene.data.pipeline.batching import parse_batching, row_collate
from mmscene.data.pipeline.chat_template import DEFAULT_SYSTEM_PROMPT
from mmscene.data.pipeline.collate import pad_collate
from mmscene.data.pipeline.encode import PromptEncoder, load_tokenizer
from mmscene.data.pipeline.eval_samples import SKIPS_KEY, EvalSamples
from mmscene.data.pipeline.mixer import STATE_KEY, MixedBatches, Source, check_sources
from mmscene.data.tar_reader import Located, ShardScan, read_located
from mmscene.registry import get_scenario

log = logging.getLogger(__name__)


def _sources(specs: list[dict[str, Any]] | None, what: str) -> list[Source]:
    out = []
    for i, spec in enumerate(specs or []):
        if not isinstance(spec, dict):
            raise ValueError(f"data.{what}[{i}] must be a mapping with shards / scenario / weight")
        unknown = sorted(set(spec) - {"shards", "scenario", "weight", "name"})
        if unknown:
            raise ValueError(
                f"data.{what}[{i}]: unknown keys {unknown} (allowed: shards, scenario, weight, name)"
            )
        if "shards" not in spec or "scenario" not in spec:
            raise ValueError(f"data.{what}[{i}] needs 'shards' and 'scenario'")
        out.append(Source(**spec))
    return out


class MMSceneDataModule(L.LightningDataModule):
    """
    Args:
        tokenizer: folder or hub id of the tokenizer (its chat template is used when it has one).
        train / val / test: sources, each ``{shards: glob|list, scenario: name, weight: float, name: str}``.
        scenarios: options per scenario plugin, e.g. ``{video: {num_frames: 8}}``.
        batch_size: training samples per batch and rank; eval_batch_size likewise for generation.
        num_workers: DataLoader workers per rank, for training and for evaluation (each worker
            reads its own share of the rank's evaluation samples).
        max_length: token limit per sample; ``overflow`` trims whole turns or skips the sample.
        system_prompt: system turn added to every conversation (null: none).
        pad_to_square: pad images to a square with the mean colour before resizing.
        seed: data order and formatting randomness (independent of the model seed).
        shuffle_buffer: samples each training stream shuffles among (held as shard locations,
            not bytes, and saved in checkpoints as restore keys); 0 reads shards in order.
        batching: how training batches are formed (see :mod:`mmscene.data.pipeline.batching`):
            ``{mode: samples}`` (default) takes ``batch_size`` samples padded to the longest;
            ``{mode: tokens, max_tokens: 4096, lookahead: 64, pack: true, row_tokens: null}``
            fills a budget of ``max_tokens`` tokens per batch (padding included), chosen from a
            buffer of ``lookahead`` samples, packed into rows of ``row_tokens`` (default
            ``max_tokens``) or, with ``pack: false``, one sample per row padded to the batch's
            longest. The buffer is part of the resumable data state.
        predict: JSONL of prompts with media paths for ``mmscene predict`` (see
            :mod:`mmscene.data.ingest.prompts`); media paths are confined to ``predict_media_root``;
            answers go to ``predict_output``.
    """

    def __init__(
        self,
        tokenizer: str,
        train: list[dict[str, Any]] | None = None,
        val: list[dict[str, Any]] | None = None,
        test: list[dict[str, Any]] | None = None,
        scenarios: dict[str, dict[str, Any]] | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        max_length: int | None = 4096,
        overflow: Literal["trim", "skip"] = "trim",
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        pad_to_square: bool = True,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        batching: dict[str, Any] | None = None,
        predict: str | None = None,
        predict_media_root: str | None = None,
        predict_output: str = "predictions.jsonl",
    ):
        super().__init__()
        self.save_hyperparameters()  # the tokenizer path travels with checkpoints (export, predict)
        self.predict, self.predict_media_root, self.predict_output = (
            predict,
            predict_media_root,
            predict_output,
        )
        self.tokens = parse_batching(batching)
        if self.tokens is not None and max_length is not None and max_length > self.tokens.row_capacity:
            # Longer samples could never be batched; the mixer would skip them (counted) one by one.
            raise ValueError(
                f"data.max_length={max_length} exceeds what one row of data.batching holds "
                f"({self.tokens.row_capacity} tokens); raise max_tokens/row_tokens or lower max_length"
            )
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError("batch sizes must be >= 1")
        if shuffle_buffer < 0:
            raise ValueError(f"data.shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.shuffle_buffer = shuffle_buffer
        self.sources = {
            "train": _sources(train, "train"),
            "val": _sources(val, "val"),
            "test": _sources(test, "test"),
        }
        for stage, sources in self.sources.items():
            if sources:
                try:
                    check_sources(sources)
                except (FileNotFoundError, ValueError) as err:
                    raise ValueError(f"data.{stage}: {err}") from err
        options = scenarios or {}
        used = {s.scenario for group in self.sources.values() for s in group}
        stray = sorted(set(options) - used)
        if stray:
            log.warning("options given for scenarios no source uses: %s", stray)
        # Fails here, at start, when no installed plugin provides a scenario.
        self.scenarios = {name: get_scenario(name, **options.get(name, {})) for name in sorted(used)}
        self.tokenizer = load_tokenizer(tokenizer)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers = num_workers
        self.max_length, self.overflow = max_length, overflow
        self.system_prompt = system_prompt
        self.pad_to_square = pad_to_square
        self.seed = seed
        self.encoder: PromptEncoder | None = None
        self._consumed = 0
        self._slots: dict[str, Any] = {}
        self._resume: dict[str, Any] | None = None
        self._task_cache: dict[str, list[tuple[str, str, str]]] = {}

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        module = self.trainer.lightning_module
        geometry = module.geometry(self.pad_to_square)
        token_id = self.tokenizer.convert_tokens_to_ids("<image>")
        if (
            token_id is not None
            and token_id != self.tokenizer.unk_token_id
            and token_id != geometry.image_token_id
        ):
            raise ValueError(
                f"the tokenizer's <image> id is {token_id} but the model's image_token_id is {geometry.image_token_id}"
            )
        vocab = module.model_config.text_config.vocab_size
        if len(self.tokenizer) > vocab:
            raise ValueError(
                f"the tokenizer has {len(self.tokenizer)} tokens but the LLM vocabulary only {vocab}"
            )
        anyres = sorted(name for name, plugin in self.scenarios.items() if getattr(plugin, "anyres", False))
        if anyres and not geometry.grid_pinpoints:
            raise ValueError(
                f"data.scenarios: {anyres} cut images into AnyRes crops, but the model has no "
                "image_grid_pinpoints (model.model.config / the checkpoint): set them or drop anyres"
            )
        self.encoder = PromptEncoder(
            self.tokenizer, geometry, self.system_prompt, max_length=self.max_length, overflow=self.overflow
        )
        module.tokenizer = self.tokenizer
        if stage == "predict":
            self._prepare_prompts()

    def _prepare_prompts(self) -> None:
        from mmscene.data.ingest.prompts import prompts_to_shards

        if not self.predict:
            raise ValueError(
                "mmscene predict needs --data.predict PROMPTS.jsonl (and --data.predict_media_root DIR)"
            )
        out = Path(self.trainer.default_root_dir) / "predict_shards"
        if self.trainer.is_global_zero:
            report = prompts_to_shards(self.predict, self.predict_media_root or ".", out)
            if report["skipped"]:
                log.warning(
                    "prompts rejected: %s (see %s)", report["skipped"], out / "shards" / "rejected.jsonl"
                )
        self.trainer.strategy.barrier()
        shards = out / "shards"
        found = sorted(p.name for p in shards.iterdir() if p.is_dir() and any(p.glob("*.tar")))
        if not found:
            raise ValueError(f"no usable prompts in {self.predict} (see {shards / 'rejected.jsonl'})")
        self.sources["predict"] = [Source(shards=str(shards / name), scenario=name) for name in found]
        for name in found:
            if name not in self.scenarios:
                self.scenarios[name] = get_scenario(name)

    def _rank(self) -> tuple[int, int]:
        # LightningDataModule keeps its trainer in ``self.trainer`` (it has no ``_trainer``); reading
        # ``_trainer`` made every rank draw rank 0's stream and broke resuming a multi-rank checkpoint.
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        if not self.sources["train"]:
            raise ValueError("data.train has no sources")
        rank, world = self._rank()
        pad_id = self.tokenizer.pad_token_id
        collate = (
            row_collate(pad_id, self.tokens.pack) if self.tokens else partial(pad_collate, pad_id=pad_id)
        )
        dataset = MixedBatches(
            self.sources["train"],
            self.scenarios,
            self.encoder.encode,
            collate,
            self.batch_size,
            seed=self.seed,
            rank=rank,
            world_size=world,
            tokens=self.tokens,
            shuffle_buffer=self.shuffle_buffer,
        )
        if self._resume is not None:
            if self._resume.get("num_workers") != self.num_workers:
                raise ValueError(
                    f"resuming the data stream needs num_workers={self._resume.get('num_workers')} "
                    f"(the checkpoint's), got {self.num_workers}"
                )
            dataset.resume = {"consumed": self._resume["consumed"], "slots": self._resume["slots"]}
            self._consumed, self._slots = self._resume["consumed"], dict(self._resume["slots"])
        return DataLoader(
            dataset,
            batch_size=None,
            # the batches come collated: torch's default_convert would walk every value of them,
            # the data state's thousands of restore keys included (~25% of the demo model's step)
            collate_fn=as_collated,
            num_workers=self.num_workers,
            persistent_workers=False,
            worker_init_fn=exit_with_parent,
            # pinned host batches: Lightning's copy to a GPU is then asynchronous (non_blocking)
            pin_memory=self._on_gpu(),
        )

    def _on_gpu(self) -> bool:
        device = getattr(getattr(self.trainer, "strategy", None), "root_device", None)
        return getattr(device, "type", None) == "cuda"

    def _eval_loader(self, stage: str) -> DataLoader | list:
        # Lightning warns that an IterableDataset's length may be wrong with several workers;
        # EvalSamples splits its share per worker itself and its length counts each worker's batches.
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
        if not self.sources[stage]:
            return []
        rank, world = self._rank()
        dataset = EvalSamples(
            self.sources[stage],
            self.scenarios,
            self.encoder.encode_for_generation,
            rank,
            world,
            batch_size=self.eval_batch_size,
            num_workers=self.num_workers,
        )
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            num_workers=self.num_workers,
            collate_fn=partial(_eval_collate, pad_id=self.tokenizer.pad_token_id),
            worker_init_fn=exit_with_parent,
        )

    def val_dataloader(self):
        return self._eval_loader("val")

    def test_dataloader(self):
        return self._eval_loader("test")

    def predict_dataloader(self):
        return self._eval_loader("predict")

    def eval_tasks(self, stage: str) -> list[tuple[str, str, str]]:
        if stage not in self._task_cache:
            found = set()
            for source in self.sources[stage]:
                for shard in check_sources([source])[source.name]:
                    for record in _records(shard):
                        task, qtype = record.get("task"), record.get("question_type")
                        if isinstance(task, str) and isinstance(qtype, str):
                            found.add((source.scenario, task, qtype))
            self._task_cache[stage] = sorted(found)
        return self._task_cache[stage]

    # ------------------------------------------------------------------ resumable state
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Before the transfer: the state holds thousands of restore keys that the device move
        # would otherwise walk one by one, every step.
        if isinstance(batch, dict) and STATE_KEY in batch:
            entry = batch.pop(STATE_KEY)
            self._slots[str(entry["slot"])] = entry["state"]
            self._consumed += 1
        return batch

    def skipped(self) -> dict[str, int]:
        """Skipped samples of this rank's training stream, by ``scenario/reason``."""
        total: dict[str, int] = {}
        for state in self._slots.values():
            for key, n in state["skips"].items():
                total[key] = total.get(key, 0) + n
        return total

    def state_dict(self) -> dict[str, Any]:
        mine = {"consumed": self._consumed, "slots": self._slots, "num_workers": self.num_workers}
        ranks = [mine]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)  # every rank's stream position, not only rank 0's
        return {"ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rank, world = self._rank()
        ranks = state.get("ranks", [])
        if not ranks:
            return
        if len(ranks) != world:
            raise ValueError(f"the checkpoint's data state is for {len(ranks)} ranks; this run has {world}")
        self._resume = ranks[rank]


def exit_with_parent(worker_id: int) -> None:
    """Makes a loader worker exit as soon as its trainer process is gone (SIGKILL, OOM kill).

    torch's worker notices a dead parent, but then waits at exit to flush its last batch into a
    pipe nobody reads: a killed run would leave workers behind forever, holding its log pipes.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def as_collated(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def _eval_collate(samples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    batch = pad_collate(samples, pad_id, left=True)
    batch["pad"] = [bool(s.get("pad")) for s in samples]
    skips: dict[str, int] = {}
    for sample in samples:  # counts of the loader worker that made each sample
        for key, n in sample.get(SKIPS_KEY, {}).items():
            skips[key] = skips.get(key, 0) + n
    batch["skips"] = skips
    return batch


def _records(shard: str):
    """The readable records of a shard (only their ``.json`` members are read). Broken ones are
    passed over here: the evaluation pass itself counts them as skips."""
    for _, item in ShardScan(shard):
        if not isinstance(item, Located):
            continue
        located = Located(item.key, [m for m in item.members if m[0] == "json"])
        try:
            record = json.loads(read_located(shard, located).get("json", b""))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            yield record
