"""Writing WebDataset shards: sample keys and a deterministic tar writer.

A shard is a plain tar; one sample is the run of consecutive members ``KEY.SUFFIX`` sharing a
key (``KEY.json``, ``KEY.0.jpg``, ``KEY.mp4``, ``KEY.asset0.mtl`` ...). WebDataset splits a member
name at the first dot of its base name, so keys never contain dots, and suffixes are lower case
because WebDataset lower-cases them when reading.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from collections.abc import Iterable
from pathlib import Path

from mmscene.data.shards import SHARD_PATTERN, write_index

MAX_KEY_CHARS = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_SUFFIX = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)*$")


def safe_key(text: str) -> str:
    """A WebDataset-safe spelling of a sample id: ``[A-Za-z0-9_-]``, no dots, bounded length."""
    key = _UNSAFE.sub("_", text).strip("_") or "sample"
    if len(key) > MAX_KEY_CHARS:
        # keep a readable prefix; the hash keeps two long ids with the same prefix apart
        digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]
        key = f"{key[: MAX_KEY_CHARS - 11]}_{digest}"
    return key


class KeyAllocator:
    """Hands out unique keys in call order: ``a``, ``a_1``, ``a_2`` ... for repeated ids.

    Uniqueness matters beyond tidiness: WebDataset groups *consecutive* members by key, so two
    samples with the same key written next to each other would merge into one.
    """

    def __init__(self) -> None:
        self._used: set[str] = set()

    def __call__(self, sample_id: str) -> str:
        base = safe_key(sample_id)
        key, n = base, 0
        while key in self._used:
            n += 1
            key = f"{base}_{n}"
        self._used.add(key)
        return key


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One member with fixed mtime, owner and mode: the same bytes give the same shard."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Writes samples into ``DIRECTORY/shard-000000.tar``, ``shard-000001.tar`` ... of ``shard_size``.

    Output is byte-for-byte reproducible (fixed mtime, owner and mode), so the same input gives
    the same shards whatever the worker count. A shard is written as ``*.tar.part`` and renamed
    when complete, so an interrupted run never leaves a truncated ``.tar`` that looks finished;
    ``close`` writes the folder's index (:data:`INDEX_NAME`).
    """

    def __init__(self, directory: Path | str, shard_size: int = 1000):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.directory = Path(directory)
        self.shard_size = shard_size
        self.paths: list[Path] = []
        self.counts: list[int] = []
        self._tar: tarfile.TarFile | None = None
        self._part: Path | None = None
        self._count = 0

    def write(self, key: str, members: Iterable[tuple[str, bytes]]) -> None:
        """Append one sample: ``members`` are ``(suffix, bytes)``, written as ``KEY.SUFFIX``."""
        if not key or "." in key or "/" in key:
            raise ValueError(f"bad sample key {key!r}: keys must be non-empty, without dots or slashes")
        if self._tar is None or self._count >= self.shard_size:
            self._roll()
        assert self._tar is not None
        seen: set[str] = set()
        for suffix, data in members:
            if not _SUFFIX.match(suffix) or suffix in seen:
                raise ValueError(f"bad or repeated member suffix {suffix!r} for sample {key!r}")
            seen.add(suffix)
            add_member(self._tar, f"{key}.{suffix}", data)
        self._count += 1

    def _roll(self) -> None:
        self._finish()
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / SHARD_PATTERN.format(len(self.paths))
        self._part = final.with_name(final.name + ".part")
        self._tar = tarfile.open(self._part, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 - spans write() calls
        self.paths.append(final)
        self._count = 0

    def _finish(self) -> None:
        if self._tar is not None and self._part is not None:
            self._tar.close()
            os.replace(self._part, self.paths[-1])
            self.counts.append(self._count)
            self._tar = self._part = None

    def close(self) -> list[Path]:
        """Finish the last shard and write the index; returns every shard path written, in order."""
        self._finish()
        if self.paths:
            write_index(self.directory, {p.name: n for p, n in zip(self.paths, self.counts)})
        return list(self.paths)

    def abort(self) -> None:
        """Drop the shard in progress (on errors): no partial file is left behind."""
        if self._tar is not None and self._part is not None:
            self._tar.close()
            self._part.unlink(missing_ok=True)
            self.paths.pop()
            self._tar = self._part = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
