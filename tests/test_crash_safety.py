"""Atomic checkpoint saves and removals, and which checkpoint resume takes (one process, fast).

The kills themselves, on 1 and 2 ranks, are in tests/test_crash_soak.py.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from lightning.pytorch.trainer.states import TrainerFn

from mmscene.train import atomic
from mmscene.train.resume import incomplete_reason
from mmscene.train.trainer import MMSceneTrainer


def _file(path: Path, step: int, mtime: float | None = None) -> Path:
    torch.save({"global_step": step, "w": torch.arange(100.0)}, path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def _dcp(path: Path, step: int, mtime: float | None = None) -> Path:
    """A distributed checkpoint folder as ModelParallelStrategy writes it (one process)."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"state_dict": {"w": torch.arange(100.0)}}, checkpoint_id=path, no_dist=True)
    torch.save({"global_step": step}, path / "meta.pt")
    if mtime is not None:
        os.utime(path / "meta.pt", (mtime, mtime))
    return path


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_completeness_of_files_and_distributed_folders(tmp_path):
    assert incomplete_reason(_file(tmp_path / "a.ckpt", 1)) is None
    _truncate(tmp_path / "a.ckpt")
    assert "archive" in incomplete_reason(tmp_path / "a.ckpt")
    assert incomplete_reason(tmp_path / "missing.ckpt") == "missing"

    folder = _dcp(tmp_path / "d.ckpt", 1)
    assert incomplete_reason(folder) is None
    shard = next(folder.glob("*.distcp"))
    _truncate(shard, 0.9)
    assert "short" in incomplete_reason(folder)
    shard.unlink()
    assert "missing" in incomplete_reason(folder)

    folder = _dcp(tmp_path / "e.ckpt", 1)
    (folder / "meta.pt").unlink()
    assert incomplete_reason(folder) == "no meta.pt"
    (folder / ".metadata").unlink()  # the observed crash: shards only
    assert ".metadata" in incomplete_reason(folder)


def test_temporary_names_keep_lightning_hpc_numbering(tmp_path):
    _file(tmp_path / "hpc_ckpt_1.ckpt", 1)
    for prefix in (atomic.PARTIAL, atomic.ASIDE, atomic.REMOVING):
        name = atomic.temporary(tmp_path / "hpc_ckpt_7.ckpt", prefix)
        assert "ckpt_" not in name.name
        assert atomic.original_name(name.name) == (prefix, "hpc_ckpt_7.ckpt")
        name.write_bytes(b"x")
    assert _CheckpointConnector.hpc_save_path(tmp_path).endswith("hpc_ckpt_2.ckpt")


def test_publish_replaces_files_and_folders(tmp_path):
    final = _file(tmp_path / "last.ckpt", 1)
    partial = _dcp(atomic.temporary(final, atomic.PARTIAL), 2)
    atomic.publish(partial, final)  # a file replaced by a folder
    assert final.is_dir() and incomplete_reason(final) is None
    partial = _file(atomic.temporary(final, atomic.PARTIAL), 3)
    atomic.publish(partial, final)
    assert torch.load(final, weights_only=True)["global_step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def _connector(tmp_path: Path) -> MMSceneTrainer:
    return MMSceneTrainer(
        default_root_dir=tmp_path,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpts")],
        logger=False,
        enable_progress_bar=False,
    )._checkpoint_connector


def _resolve(connector, ckpt_path):
    return connector._parse_ckpt_path(
        TrainerFn.FITTING, ckpt_path, model_provided=True, model_connected=False
    )


def test_interrupted_replacement_keeps_a_complete_copy(tmp_path, monkeypatch, caplog):
    """Killed between moving the old last.ckpt aside and renaming the new one in: the old copy is
    what resume takes (the new one is only a temporary), and the next save renames it back."""
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    _dcp(ckpts / "epoch=0-step=2.ckpt", 2, mtime=1000)
    last = _dcp(ckpts / "last.ckpt", 2, mtime=1001)
    partial = _dcp(atomic.temporary(last, atomic.PARTIAL), 4)

    def killed(path):
        raise SystemExit("killed")

    monkeypatch.setattr(os, "replace", _replace_then(killed, after=1))
    with pytest.raises(SystemExit):
        atomic.publish(partial, last)
    monkeypatch.undo()
    assert not last.exists() and (ckpts / ".replaced-last.ckpt").is_dir() and partial.is_dir()
    with caplog.at_level(logging.INFO, logger="mmscene"):
        chosen = _resolve(_connector(tmp_path), "last")
    assert chosen == str(ckpts / ".replaced-last.ckpt")
    assert ".partial-last.ckpt: temporary name of an unfinished save" in caplog.text
    atomic.clean_leftovers(ckpts)
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == 2


def _replace_then(action, after: int):
    """os.replace that runs ``action`` instead of the call after ``after`` successful ones."""
    real, calls = os.replace, []

    def replace(src, dst):
        if len(calls) == after:
            action(src)
        calls.append(src)
        return real(src, dst)

    return replace


def test_interrupted_removal_is_never_resumed(tmp_path, monkeypatch):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    old = _file(ckpts / "epoch=0-step=2.ckpt", 2, mtime=1000)
    _file(ckpts / "epoch=0-step=4.ckpt", 4, mtime=900)  # older by time: taken only if step 2 were
    delete = atomic.delete

    def killed_once_renamed(path):
        if path.exists():
            raise SystemExit("killed")
        delete(path)

    monkeypatch.setattr(atomic, "delete", killed_once_renamed)
    with pytest.raises(SystemExit):
        atomic.remove(old)
    monkeypatch.undo()
    assert (ckpts / ".removing-epoch=0-step=2.ckpt").is_file() and not old.exists()
    assert _resolve(_connector(tmp_path), "last") == str(ckpts / "epoch=0-step=4.ckpt")
    atomic.remove(old)  # missing: not an error
    atomic.clean_leftovers(ckpts)
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=4.ckpt"]


def test_resolution_skips_incomplete_checkpoints(tmp_path, caplog):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    whole = _dcp(ckpts / "epoch=0-step=4.ckpt", 4, mtime=1000)
    torn = _dcp(ckpts / "last.ckpt", 6, mtime=1002)
    (torn / ".metadata").unlink()
    (torn / "meta.pt").unlink()
    os.utime(torn, (1003, 1003))
    _file(ckpts / "epoch=0-step=1.ckpt", 1, mtime=10)
    connector = _connector(tmp_path)
    with caplog.at_level(logging.INFO, logger="mmscene"):
        assert _resolve(connector, "last") == str(whole)
        assert _resolve(connector, str(torn)) == str(whole)  # an explicit incomplete path falls back
    assert "last.ckpt: no .metadata" in caplog.text and "(1 older complete)" in caplog.text
    assert _resolve(connector, str(whole)) == str(whole)  # a complete path is Lightning's business
    for entry in (whole, ckpts / "epoch=0-step=1.ckpt"):
        atomic.delete(entry)
    assert _resolve(connector, "last") is None
    with pytest.raises(ValueError, match="nor is any beside it"):
        _resolve(connector, str(torn))


def test_slurm_requeue_resume_takes_the_newest_complete(tmp_path, fake_slurm, caplog):
    _file(tmp_path / "hpc_ckpt_1.ckpt", 3, mtime=1000)
    _file(tmp_path / "hpc_ckpt_2.ckpt", 5, mtime=1001)
    _truncate(tmp_path / "hpc_ckpt_2.ckpt")  # torn by something other than a kill (disk full)
    _file(atomic.temporary(tmp_path / "hpc_ckpt_3.ckpt", atomic.PARTIAL), 7, mtime=1002)
    connector = _connector(tmp_path)
    with caplog.at_level(logging.INFO, logger="mmscene"):
        assert _resolve(connector, None) == str(tmp_path / "hpc_ckpt_1.ckpt")
    assert "resume (SLURM requeue): taking" in caplog.text and "hpc_ckpt_2.ckpt: not a whole" in caplog.text
    for name in ("hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt"):
        (tmp_path / name).unlink()
    assert _resolve(connector, None) is None  # only an unfinished save: a fresh start
    with pytest.raises(ValueError, match="no complete checkpoint"):
        _resolve(connector, "hpc")


class _Steps(BoringModel):
    def __init__(self):
        super().__init__()
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(self.global_step)
        return super().training_step(batch, batch_idx)


def _trainer(root: Path, steps: int) -> MMSceneTrainer:
    return MMSceneTrainer(
        default_root_dir=root,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=root / "ckpts", every_n_train_steps=1, save_last=True)],
    )


def test_trainer_saves_atomically_and_cleans_up(tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    leftovers = [
        _file(atomic.temporary(ckpts / "last.ckpt", atomic.PARTIAL), 9),
        _file(atomic.temporary(ckpts / "epoch=0-step=1.ckpt", atomic.REMOVING), 1),
    ]
    trainer = _trainer(tmp_path, 3)
    assert type(trainer.strategy.checkpoint_io).__name__ == "CrashSafeCheckpointIO"
    trainer.fit(_Steps(), ckpt_path="last")  # nothing complete yet: a fresh start
    assert not any(p.exists() for p in leftovers)
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=3.ckpt", "last.ckpt"]
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 3

    _truncate(ckpts / "last.ckpt")
    model = _Steps()
    again = _trainer(tmp_path, 5)
    again.fit(model, ckpt_path=str(ckpts / "last.ckpt"))
    assert again.ckpt_path == str(ckpts / "epoch=0-step=3.ckpt")  # what Lightning then reports
    assert model.seen == [3, 4]


def test_cli_resumes_from_last_past_a_torn_file(tmp_path, demo_data):
    """``mmscene fit --ckpt_path last`` goes through the same resolution."""
    import json
    import subprocess
    import sys

    from train_helpers import tiny_config, write_config

    tests = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=f"{tests}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    ckpts, record = tmp_path / "ckpts", tmp_path / "batches.jsonl"

    def fit(steps: int, *extra: str) -> subprocess.CompletedProcess:
        cfg = tiny_config(demo_data, tmp_path / "run", max_steps=steps)
        cfg["data"]["num_workers"] = 1
        cfg["trainer"]["callbacks"] = [
            {"class_path": "train_helpers.RecordBatches", "init_args": {"path": str(record)}},
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(ckpts), "every_n_train_steps": 1, "save_last": True},
            },
        ]
        config = write_config(cfg, tmp_path / f"fit{steps}.yaml")
        cmd = [sys.executable, "-m", "mmscene.cli", "fit", "--config", str(config), *extra]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)

    done = fit(2)
    assert done.returncode == 0, done.stderr[-3000:]
    _truncate(ckpts / "last.ckpt")  # e.g. a copy cut short
    done = fit(3, "--ckpt_path", "last")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resume (last): taking {ckpts / 'epoch=0-step=2.ckpt'}," in done.stderr
    assert "last.ckpt: not a whole torch.save archive" in done.stderr
    steps = [json.loads(line)["step"] for line in record.read_text().splitlines()]
    assert steps == [0, 1, 2]
