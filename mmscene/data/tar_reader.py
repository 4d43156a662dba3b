"""Reading one shard: samples grouped by key as WebDataset does, every defect under a reason.

webdataset's tar iterator skips links and special members without a word, reads a member whole
whatever its size and gives up on a shard at the first duplicate name. A multi-day run needs
each of those counted as a skip of one sample, so shards are read here with ``tarfile``
directly: headers first, member data only for samples that are wanted and pass the checks.

A sample's index is its position among the shard's key groups, defective ones included, so a
stream cursor (and the shard index's sample count) means the same whatever was skipped.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from typing import Any

# No sample of any scenario comes near this (a 1080p minute of video is ~100 MB); a larger
# member is a broken or hostile shard and is skipped without being read.
MAX_MEMBER_BYTES = 512 << 20
# WebDataset's split: the key runs to the first dot of the base name (folders belong to the key).
_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")

# reasons
NOT_A_TAR = "not_a_tar"
EMPTY_SHARD = "empty_shard"
MISSING_SHARD = "missing_shard"
TRUNCATED_SHARD = "truncated_shard"
UNSAFE_NAME = "unsafe_member_name"
LINK_MEMBER = "link_member"
SPECIAL_MEMBER = "special_member"
OVERSIZED_MEMBER = "oversized_member"
DUPLICATE_MEMBER = "duplicate_member"
BAD_MEMBER_NAME = "bad_member_name"


@dataclasses.dataclass
class Defect:
    """A sample (or, when ``fatal``, the rest of the shard from this index on) that cannot be read."""

    reason: str
    detail: str
    key: str = ""
    fatal: bool = False


def split_name(name: str) -> tuple[str, str] | None:
    match = _KEY_SUFFIX.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


def _unsafe(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or bool(re.match(r"^[A-Za-z]:", name))


def _member_defect(member: tarfile.TarInfo, max_bytes: int) -> str:
    if _unsafe(member.name):
        return UNSAFE_NAME
    if member.issym() or member.islnk():
        return LINK_MEMBER
    if not member.isreg():
        return SPECIAL_MEMBER
    if member.size > max_bytes:
        return OVERSIZED_MEMBER
    if split_name(member.name) is None:
        return BAD_MEMBER_NAME
    return ""


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo | Defect]:
    while True:
        try:
            member = tar.next()
        except (tarfile.TarError, EOFError, OSError) as err:
            yield Defect(TRUNCATED_SHARD, f"unreadable header: {err}", fatal=True)
            return
        if member is None:
            return
        tar.members = []  # tarfile keeps every header it read; a shard can hold millions
        if member.isdir():
            continue  # a folder entry is not part of any sample
        yield member


@dataclasses.dataclass
class Located:
    """Where a sample's members lie in its shard: ``(suffix, data offset, size)`` each."""

    key: str
    members: list[tuple[str, int, int]]


class ShardScan:
    """``(index, Located)`` for samples at ``index >= start`` that are ``wanted``, ``(index, Defect)``
    for those that cannot be read; a ``fatal`` defect ends the shard (``index`` = first sample lost).

    Only headers are read: member data is read later, by :func:`read_located`. After a scan that
    reached the end of the tar cleanly, ``count`` is the number of samples the shard holds.
    """

    def __init__(
        self,
        path: str,
        start: int = 0,
        wanted: Callable[[int], bool] | None = None,
        max_member_bytes: int = MAX_MEMBER_BYTES,
    ):
        self.path, self.start, self.wanted, self.max_member_bytes = path, start, wanted, max_member_bytes
        self.count: int | None = None

    def _mine(self, index: int) -> bool:
        return index >= self.start and (self.wanted is None or self.wanted(index))

    def __iter__(self) -> Iterator[tuple[int, Located | Defect]]:
        path = self.path
        try:
            tar = tarfile.open(path, "r:")  # noqa: SIM115 - closed below, also on early exit
        except FileNotFoundError as err:
            yield self.start, Defect(MISSING_SHARD, str(err), fatal=True)
            return
        except (tarfile.TarError, OSError, EOFError) as err:
            empty = os.path.isfile(path) and os.path.getsize(path) == 0
            yield self.start, Defect(EMPTY_SHARD if empty else NOT_A_TAR, f"{path}: {err}", fatal=True)
            return
        try:
            yield from self._groups(tar, os.fstat(tar.fileobj.fileno()).st_size)
        finally:
            tar.close()

    def _groups(self, tar: tarfile.TarFile, size: int) -> Iterator[tuple[int, Located | Defect]]:
        path = self.path
        index, key = -1, None
        found = Located("", [])
        defect: Defect | None = None
        data_end = 0  # where the last member's data ends: past the file's end, its sample is cut
        for member in _members(tar):
            if isinstance(member, Defect):
                cut = key is not None and data_end > size
                if cut and self._mine(index):
                    yield (
                        index,
                        Defect(TRUNCATED_SHARD, f"{path}: sample cut off ({member.detail})", key, True),
                    )
                    return
                if not cut and key is not None and self._mine(index):
                    yield index, defect or found  # whole: the damage starts after it
                # the first sample lost, never one before ``start``
                first = index if cut else index + 1
                yield max(first, self.start), dataclasses.replace(member, detail=f"{path}: {member.detail}")
                return
            data_end = member.offset_data + member.size
            parts = split_name(member.name)
            member_key = parts[0] if parts else member.name
            if member_key != key:
                if key is not None and self._mine(index):
                    yield index, defect or found
                index, key, found, defect = index + 1, member_key, Located(member_key, []), None
            if not self._mine(index) or defect is not None:
                continue  # not ours, or already lost: its data is never read
            reason = _member_defect(member, self.max_member_bytes)
            if not reason and any(parts[1] == suffix for suffix, _, _ in found.members):
                reason = DUPLICATE_MEMBER
            if not reason and member.offset_data + member.size > size:
                yield (
                    index,
                    Defect(TRUNCATED_SHARD, f"{path}: member {member.name!r} cut off", member_key, True),
                )
                return
            if reason:
                defect = Defect(reason, f"{path}: member {member.name!r} ({member.size} bytes)", member_key)
                continue
            found.members.append((parts[1], member.offset_data, member.size))
        if key is not None and self._mine(index):
            yield index, defect or found
        self.count = index + 1


def read_located(path: str, located: Located) -> dict[str, Any]:
    """The sample ``{"__key__": key, "<suffix>": bytes, ...}`` as WebDataset makes it."""
    sample: dict[str, Any] = {"__key__": located.key}
    with open(path, "rb") as f:
        for suffix, offset, size in located.members:
            f.seek(offset)
            data = f.read(size)
            if len(data) != size:
                raise EOFError(
                    f"{path}: member {located.key}.{suffix} is cut off ({len(data)} of {size} bytes)"
                )
            sample[suffix] = data
    return sample


def read_shard(
    path: str, start: int = 0, wanted: Callable[[int], bool] | None = None
) -> Iterator[tuple[int, dict[str, Any] | Defect]]:
    """:func:`scan_shard` with each sample's data read."""
    for index, item in ShardScan(path, start, wanted):
        if isinstance(item, Defect):
            yield index, item
            if item.fatal:
                return
            continue
        try:
            yield index, read_located(path, item)
        except OSError as err:
            yield index, Defect(TRUNCATED_SHARD, str(err), item.key, True)
            return
