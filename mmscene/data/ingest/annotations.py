"""Reading annotation files: a ``.json`` array element by element, ``.jsonl`` line by line, or
every record in a seeded random order (two passes through a spill file, bounded memory).
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import ijson

from mmscene.data.seeds import CONVERT_ORDER, rng_for

# Guard for the streaming .json reader: one array element larger than this (bytes) is not a record.
MAX_ELEMENT_CHARS = 256 << 20
# A record nested deeper than this is not a record either (and would overflow the stack when it
# is written back out, or printed).
MAX_NESTING = 100


def _too_deep(value: Any, limit: int = MAX_NESTING) -> bool:
    stack = [(value, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def json_line(value: Any) -> bytes:
    """``value`` as UTF-8 JSON; escaped ASCII where it holds lone surrogates (which JSON allows
    as ``\\ud800`` escapes but UTF-8 cannot encode)."""
    try:
        return json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value).encode("ascii")


@dataclasses.dataclass
class Item:
    """One annotation record as read: ``record`` is the parsed value, or the raw text with ``error``."""

    index: int
    record: Any
    error: str = ""
    offset: int = 0  # bytes of the file read so far (progress)


def iter_annotations(path: Path | str, chunk_size: int = 1 << 20) -> Iterator[Item]:
    """Stream the records of a LLaVA-style annotation file without loading it whole.

    A file whose first character is ``[`` is one JSON array (``index`` = array position); anything
    else is JSON Lines (``index`` = 0-based line number; blank lines are skipped). A bad JSONL line
    is yielded with ``error`` set; a malformed array cannot be resynchronised and raises ValueError.
    """
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(4096).lstrip(codecs.BOM_UTF8).lstrip()
        f.seek(0)
        if head.startswith(b"["):
            yield from _iter_json_array(f, path, chunk_size)
        else:
            yield from _iter_json_lines(f)


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # the json module's extension; ijson refuses it too


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _iter_json_lines(f: BinaryIO) -> Iterator[Item]:
    for lineno, raw in enumerate(f):
        line = raw.lstrip(codecs.BOM_UTF8).strip() if lineno == 0 else raw.strip()
        if not line:
            continue
        try:
            value = json.loads(line.decode("utf-8"), parse_constant=_not_json, parse_float=_finite)
            if _too_deep(value):
                raise ValueError(f"nested deeper than {MAX_NESTING} levels")
        except (UnicodeDecodeError, ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
            yield Item(lineno, line.decode("utf-8", "replace"), error=str(err), offset=f.tell())
            continue
        yield Item(lineno, value, offset=f.tell())


class _ArrayReader:
    """The file as ijson reads it: without a UTF-8 BOM, and refusing one element past the limit."""

    def __init__(self, f: BinaryIO):
        self.f, self.first, self.since_mark = f, True, 0

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        if self.first and data:  # (ijson first reads 0 bytes to learn the file's type)
            data, self.first = data.removeprefix(codecs.BOM_UTF8), False
        self.since_mark += len(data)
        if self.since_mark > MAX_ELEMENT_CHARS:
            raise _ElementTooLarge
        return data


class _ElementTooLarge(Exception):
    pass


# ijson's Python backend, not its C one: yajl reads an escaped lone surrogate ("\\ud800") as "?"
# and refuses integers beyond 64 bits, which the json module (and so the .jsonl path) keeps.
# It parses about 10 MB/s, far ahead of the media checks of the records it yields.
_IJSON = ijson.get_backend("python")


def _iter_json_array(f: BinaryIO, path: Path, chunk_size: int) -> Iterator[Item]:
    """``[ {...}, {...} ]`` element by element with ijson's event parser.

    Events, not ``ijson.items``: the depth is counted here, so an element nested too deeply is
    reported and read past without being built (building it, or its prefix strings, is what a
    hostile file would exhaust memory with).
    """
    reader = _ArrayReader(f)
    index, depth, builder, too_deep = 0, 0, None, False
    try:
        for event, value in _IJSON.basic_parse(reader, buf_size=max(chunk_size, 64), use_float=True):
            if depth == 0:
                if event != "start_array":
                    raise ValueError("file does not start with '['")
                depth = 1
                continue
            if depth == 1 and event == "end_array":
                depth = 0
                continue
            opens, closes = event in ("start_map", "start_array"), event in ("end_map", "end_array")
            if builder is None and not too_deep:  # an element starts
                builder, reader.since_mark = ijson.ObjectBuilder(), 0
            depth += opens - closes
            if depth > MAX_NESTING + 1:
                builder, too_deep = None, True
            if builder is not None:
                builder.event(event, value)
            if depth == 1:  # the element ended
                offset = f.tell()
                if too_deep:
                    text = f"<element {index}: not kept, nested deeper than {MAX_NESTING} levels>"
                    yield Item(index, text, error=f"nested deeper than {MAX_NESTING} levels", offset=offset)
                else:
                    yield Item(index, builder.value, offset=offset)
                index, builder, too_deep = index + 1, None, False
    except _ElementTooLarge:
        raise ValueError(
            f"{path}: malformed JSON array at element {index}: element larger than {MAX_ELEMENT_CHARS} bytes"
        ) from None
    except (ijson.JSONError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError too
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path}: malformed JSON array at element {index}: {message}") from err
    if depth:
        raise ValueError(f"{path}: malformed JSON array at element {index}: unexpected end of file")


def shuffled_annotations(path: Path, spill: Path, seed: int) -> Iterator[Item]:
    """The records of ``path`` in a seeded random order, with bounded memory.

    A first pass copies every record as one JSON line into ``spill`` (kept: its byte range); the
    second reads them back in a shuffled order by seeking. Only two integers per record stay in
    memory, and the media, the expensive part, is read once, by the caller.
    """
    ranges: list[tuple[int, int]] = []
    size = path.stat().st_size
    try:
        with spill.open("wb") as out:
            for item in iter_annotations(path):
                start = out.tell()
                line = {"index": item.index, "record": item.record, "error": item.error}
                out.write(json_line(line) + b"\n")
                ranges.append((start, out.tell() - start))
        order = list(range(len(ranges)))
        rng_for(CONVERT_ORDER, seed).shuffle(order)
        with spill.open("rb") as f:
            for done, k in enumerate(order, 1):
                start, length = ranges[k]
                f.seek(start)
                line = json.loads(f.read(length))
                offset = size * done // len(order)  # progress: the share of records done
                yield Item(line["index"], line["record"], error=line["error"], offset=offset)
    finally:
        spill.unlink(missing_ok=True)
