"""Checkpoints appear under their name only when complete.

A save writes into a temporary name in the destination's folder and is renamed when every rank
has written its part. Replacing an existing checkpoint moves the old one aside first, renames the
new one in, then deletes the old: at every instant one complete copy exists under a name that
:mod:`mmscene.train.resume` considers (the destination, or the old copy moved aside).

Temporary names never contain ``ckpt_``: Lightning numbers ``hpc_ckpt_<n>.ckpt`` from the digits
of every name in the folder holding ``ckpt_`` (``_CheckpointConnector.hpc_save_path``), so the
destination's name is kept, with ``_`` escaped.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from urllib.parse import unquote

log = logging.getLogger(__name__)

PARTIAL = ".partial-"  # being written; never resumed from
ASIDE = ".replaced-"  # a complete checkpoint moved aside while its replacement is renamed in
REMOVING = ".removing-"  # being deleted


def _escape(name: str) -> str:
    return name.replace("%", "%25").replace("_", "%5F")


def temporary(path: Path, prefix: str) -> Path:
    return path.parent / f"{prefix}{_escape(path.name)}"


def original_name(name: str) -> tuple[str | None, str]:
    """``(prefix, destination name)`` of an entry; prefix is None for an ordinary name."""
    for prefix in (PARTIAL, ASIDE, REMOVING):
        if name.startswith(prefix):
            return prefix, unquote(name[len(prefix) :])
    return None, name


def publish(partial: Path, final: Path) -> None:
    """Rename a complete ``partial`` to ``final`` (single process: rank 0)."""
    sync(partial)
    aside = move_aside(final)
    os.replace(partial, final)
    _sync_dir(final.parent)
    if aside is not None:
        delete(aside)


def move_aside(path: Path) -> Path | None:
    """Rename an existing ``path`` to its aside name (a directory cannot be replaced in one rename)."""
    if not os.path.lexists(path):
        return None
    aside = temporary(path, ASIDE)
    delete(aside)
    os.replace(path, aside)
    return aside


def remove(path: Path) -> None:
    """Delete a checkpoint: renamed first, so that a kill midway leaves no half-deleted folder
    under a checkpoint's name; a missing path is not an error."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    doomed = temporary(path, REMOVING)
    delete(doomed)
    os.replace(path, doomed)
    delete(doomed)


def delete(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()
    except OSError as err:  # a leftover is harmless: ignored by resume, retried on the next save
        log.warning("could not delete %s: %s", path, err)


def clean_leftovers(folder: Path) -> None:
    """Remove what killed saves and removals left in ``folder``; an aside copy whose destination
    is missing (killed between the two renames) is renamed back instead."""
    if not folder.is_dir():
        return
    for entry in sorted(folder.iterdir()):
        prefix, name = original_name(entry.name)
        if prefix is None:
            continue
        if prefix == ASIDE and not os.path.lexists(folder / name):
            log.info("restoring %s as %s (a replacement was interrupted)", entry.name, name)
            os.replace(entry, folder / name)
        else:
            delete(entry)


def sync(path: Path) -> None:
    """fsync a checkpoint file, or a folder's files, before it is renamed into place."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if path.is_dir():
        _sync_dir(path)


def _sync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)
