"""The shard folder format every stage shares: shard names and the index beside them.

``mmscene data convert`` writes ``DIR/shard-000000.tar`` ... (:mod:`mmscene.data.ingest.shard_writer`)
and ``DIR/shards.json``; training, evaluation and inspection read the tars with
:mod:`mmscene.data.tar_reader` and check what they read against the index.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SHARD_PATTERN = "shard-{:06d}.tar"
SHARD_GLOB = "shard-*.tar"
# Beside the shards of a folder: each shard's sample count and size, so a reader can tell a
# shard cut short at a tar block boundary (which reads as a clean, shorter tar) from a whole one.
INDEX_NAME = "shards.json"
INDEX_VERSION = 1


def write_index(directory: Path | str, counts: dict[str, int]) -> Path:
    """Record ``{shard name: sample count}`` (and each shard's size) beside the shards."""
    return _write(Path(directory), _entries(Path(directory), counts))


def update_index(directory: Path | str, counts: dict[str, int]) -> Path:
    """Rewrite the entries of these shards (count and size), keeping the index's other entries."""
    directory = Path(directory)
    shards = _read_index(directory / INDEX_NAME) or {}
    return _write(directory, {**shards, **_entries(directory, counts)})


def _entries(directory: Path, counts: dict[str, int]) -> dict[str, dict]:
    return {name: {"samples": n, "bytes": (directory / name).stat().st_size} for name, n in counts.items()}


def _write(directory: Path, shards: dict[str, dict]) -> Path:
    doc = {"version": INDEX_VERSION, "shards": dict(sorted(shards.items()))}
    tmp = directory / (INDEX_NAME + ".part")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, directory / INDEX_NAME)
    return directory / INDEX_NAME


_INDEX_CACHE: dict[str, tuple[float, dict[str, dict]]] = {}


def indexed_shard(shard: str | Path) -> dict | None:
    """The index entry (``{"samples", "bytes"}``) of a shard, or None where its folder has no index.

    A broken index is reported as an error: it would make every count after it wrong.
    """
    path = Path(shard)
    shards = _read_index(path.parent / INDEX_NAME)
    entry = shards.get(path.name) if shards is not None else None
    return entry if isinstance(entry, dict) else None


def _read_index(index: Path) -> dict[str, dict] | None:
    """The index's ``{shard name: entry}`` (cached while the file is unchanged), None where absent."""
    try:
        mtime = index.stat().st_mtime
    except FileNotFoundError:
        return None
    cached = _INDEX_CACHE.get(str(index))
    if cached is None or cached[0] != mtime:
        try:
            doc = json.loads(index.read_text(encoding="utf-8"))
            shards = doc["shards"]
            if doc.get("version") != INDEX_VERSION or not isinstance(shards, dict):
                raise ValueError(f"unsupported version {doc.get('version')!r}")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"shard index {index} is unreadable: {err}") from err
        cached = _INDEX_CACHE[str(index)] = (mtime, shards)
    return cached[1]
