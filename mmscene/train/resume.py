"""Which checkpoint a run resumes from: the newest complete one.

``ckpt_path="last"`` and SLURM's requeue resume (``hpc_ckpt_<n>.ckpt`` in ``default_root_dir``)
look at every checkpoint in the run's checkpoint folders (each ``ModelCheckpoint``'s and
``default_root_dir``'s hpc checkpoints) and take the newest complete one; an explicit path to an
incomplete checkpoint falls back to the newest complete one in its own folder. Newest is by
modification time, as Lightning's ``"last"``. Temporary names of unfinished saves and removals
(:mod:`mmscene.train.atomic`) are never taken; a complete checkpoint moved aside during a
replacement is.

Complete means:

* a file: a whole zip archive (``torch.save``'s format), checked from its central directory,
  which is written last, without reading the tensors;
* a distributed checkpoint folder: ``.metadata`` (written by DCP once every rank has written its
  shard), Lightning's ``meta.pt`` (written after it), and every shard ``.metadata`` names present
  with at least the bytes it indexes.
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from lightning.pytorch.utilities.model_registry import _is_registry
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from mmscene.train import atomic

log = logging.getLogger(__name__)

META = "meta.pt"  # Lightning's non-tensor state in a distributed checkpoint folder
HPC_PREFIX = "hpc_ckpt_"


def incomplete_reason(path: Path) -> str | None:
    """None when ``path`` is a complete checkpoint, else why not."""
    if path.is_dir():
        return _dcp_reason(path)
    if not path.is_file():
        return "missing" if not os.path.lexists(path) else "not a file or folder"
    return _zip_reason(path)


def _zip_reason(path: Path) -> str | None:
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (OSError, zipfile.BadZipFile) as err:
        return f"not a whole torch.save archive ({err})"
    if not any(m.filename.endswith("data.pkl") for m in members):
        return "no data.pkl in the archive"
    if any(m.header_offset + m.compress_size > size for m in members):
        return "archive shorter than its index"
    return None


def _dcp_reason(folder: Path) -> str | None:
    if not (folder / ".metadata").is_file():
        return "no .metadata (its shards were never all written)"
    if not (folder / META).is_file():
        return f"no {META}"
    reason = _zip_reason(folder / META)
    if reason:
        return f"{META}: {reason}"
    try:
        from torch.distributed.checkpoint import FileSystemReader

        storage = FileSystemReader(str(folder)).read_metadata().storage_data or {}
    except Exception as err:  # noqa: BLE001 - an unreadable index is an incomplete checkpoint
        return f".metadata unreadable ({err})"
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = folder / name
        if not shard.is_file() or shard.stat().st_size < size:
            return f"shard {name} missing or short"
    return None


@dataclass
class Candidate:
    path: Path
    reason: str | None  # why it cannot be resumed from; None: complete

    @property
    def mtime(self) -> float:
        stamp = self.path / META if self.path.is_dir() else self.path
        try:
            return stamp.stat().st_mtime
        except OSError:
            try:
                return self.path.stat().st_mtime
            except OSError:
                return 0.0


def candidates(folder: Path, only_hpc: bool = False) -> list[Candidate]:
    """The checkpoints of ``folder`` (``*.ckpt`` names, or ``hpc_ckpt_*`` only), each with its
    completeness; temporary names count, with their reason."""
    if not folder.is_dir():
        return []
    found = []
    for entry in sorted(folder.iterdir()):
        prefix, name = atomic.original_name(entry.name)
        if not name.endswith(".ckpt") or (only_hpc and not name.startswith(HPC_PREFIX)):
            continue
        if prefix == atomic.PARTIAL:
            found.append(Candidate(entry, "temporary name of an unfinished save"))
        elif prefix == atomic.REMOVING:
            found.append(Candidate(entry, "being removed"))
        else:  # ordinary, or a complete one moved aside by an interrupted replacement
            found.append(Candidate(entry, incomplete_reason(entry)))
    return found


def newest_complete(found: list[Candidate], why: str) -> Path | None:
    """The newest complete candidate; logs (rank 0) which, and why newer ones were passed over."""
    found = sorted(found, key=lambda c: (c.mtime, c.reason is None), reverse=True)
    chosen = next((c for c in found if c.reason is None), None)
    passed = [c for c in found if c.reason is not None]
    older = [c for c in found if c.reason is None and c is not chosen]
    skipped = "; ".join(f"{c.path.name}: {c.reason}" for c in passed) or "none"
    if chosen is None:
        _info("resume (%s): no complete checkpoint; passed over: %s", why, skipped)
        return None
    _info(
        "resume (%s): taking %s, the newest complete checkpoint (%d older complete); passed over: %s",
        why,
        chosen.path,
        len(older),
        skipped,
    )
    return chosen.path


@rank_zero_only
def _info(message: str, *args) -> None:
    log.info(message, *args)


class ResumeConnector(_CheckpointConnector):
    """Lightning's checkpoint connector with ``"last"``, ``"hpc"`` (and SLURM's implicit hpc
    resume) and incomplete explicit paths resolved to the newest complete checkpoint.

    Only path selection changes (``_parse_ckpt_path``, which every ``Trainer`` stage calls);
    the resolved path is what ``trainer.ckpt_path`` then reports.
    """

    def _parse_ckpt_path(self, state_fn, ckpt_path, model_provided: bool, model_connected: bool):
        if ckpt_path is None and SLURMEnvironment.detect() and self.hpc_candidates():
            # Lightning's rule (a requeued job resumes from its hpc checkpoints), but from the
            # newest complete checkpoint of the run; none complete: a fresh start.
            return _str(newest_complete(self.run_candidates(), "SLURM requeue"))
        if ckpt_path in ("last", "hpc"):
            found = newest_complete(self.run_candidates(), ckpt_path)
            if found is None and ckpt_path == "hpc":
                raise ValueError(
                    f'ckpt_path="hpc": no complete checkpoint in {self.trainer.default_root_dir}'
                )
            return _str(found)
        if _is_local_path(ckpt_path):
            path = Path(ckpt_path)
            reason = incomplete_reason(path)
            if reason is not None and path.parent.is_dir():
                _info("resume: %s is not a complete checkpoint (%s)", path, reason)
                found = newest_complete(candidates(path.parent), f"instead of {path.name}")
                if found is None:
                    raise ValueError(f"{path} is not a complete checkpoint ({reason}), nor is any beside it")
                return str(found)
        return super()._parse_ckpt_path(state_fn, ckpt_path, model_provided, model_connected)

    def hpc_candidates(self) -> list[Candidate]:
        root = str(self.trainer.default_root_dir)
        return candidates(Path(root), only_hpc=True) if _is_local_file_protocol(root) else []

    def run_candidates(self) -> list[Candidate]:
        """Every checkpoint of the run: each ``ModelCheckpoint`` folder's and the hpc ones."""
        folders: dict[Path, None] = {}
        for callback in self.trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):
                # Where it saves this run: dirpath, else under the logger's version or
                # default_root_dir, as Lightning's own "last" resolves it.
                folder = callback.dirpath or _resolved_dir(callback, self.trainer)
                if folder and _is_local_file_protocol(str(folder)):
                    folders[Path(folder).resolve()] = None
        found = [c for folder in folders for c in candidates(folder)]
        return found + [c for c in self.hpc_candidates() if c.path.parent.resolve() not in folders]


def _is_local_path(ckpt_path) -> bool:
    if not isinstance(ckpt_path, str | os.PathLike) or str(ckpt_path) == "best" or _is_registry(ckpt_path):
        return False
    return _is_local_file_protocol(str(ckpt_path))


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)  # Lightning keeps ckpt_path as given, a str


def _resolved_dir(callback: ModelCheckpoint, trainer) -> str | None:
    resolve = getattr(callback, "_ModelCheckpoint__resolve_ckpt_dir", None)
    return str(resolve(trainer)) if resolve is not None else None
