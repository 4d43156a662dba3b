"""Reading annotation files: a ``.json`` array element by element, ``.jsonl`` line by line, a
Parquet file record batch by record batch, or every record in a seeded random order (two passes
through a spill file, bounded memory).
"""

from __future__ import annotations

import base64
import codecs
import dataclasses
import datetime
import decimal
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
PARQUET_MAGIC = b"PAR1"
# Rows per Parquet record batch: bench rows carry their images, so a batch is kept small.
PARQUET_BATCH_ROWS = 32


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


def _omit_bytes(value: Any) -> Any:
    if isinstance(value, bytes):
        return f"<{len(value)} bytes, not kept>"
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def json_line(value: Any, omit_bytes: bool = False) -> bytes:
    """``value`` as UTF-8 JSON; escaped ASCII where it holds lone surrogates (which JSON allows
    as ``\\ud800`` escapes but UTF-8 cannot encode). ``omit_bytes``: bytes (a Parquet row's
    embedded media) are written as a note of their length (``rejected.jsonl``)."""
    default = _omit_bytes if omit_bytes else None
    try:
        return json.dumps(value, ensure_ascii=False, default=default).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, default=default).encode("ascii")


@dataclasses.dataclass
class Item:
    """One annotation record as read: ``record`` is the parsed value, or the raw text with ``error``."""

    index: int
    record: Any
    error: str = ""
    offset: int = 0  # bytes of the file read so far (progress)


def annotation_format(path: Path | str) -> str:
    """``parquet`` (the file starts with ``PAR1``), ``json`` (with ``[``) or ``jsonl``."""
    with Path(path).open("rb") as f:
        head = f.read(4096)
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    return "json" if head.lstrip(codecs.BOM_UTF8).lstrip().startswith(b"[") else "jsonl"


def pyarrow_parquet() -> Any:
    """``pyarrow.parquet``, or an ImportError that says how to install it (an optional dependency)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(f"reading Parquet annotations needs pyarrow: pip install pyarrow ({err})") from err
    return pq


def iter_annotations(path: Path | str, chunk_size: int = 1 << 20) -> Iterator[Item]:
    """Stream the records of a LLaVA-style annotation file without loading it whole.

    A file whose first character is ``[`` is one JSON array (``index`` = array position); a
    Parquet file (``PAR1``) is read batch by batch (``index`` = 0-based row); anything else is JSON
    Lines (``index`` = 0-based line number; blank lines are skipped). A bad JSONL line is yielded
    with ``error`` set; a malformed array or Parquet file cannot be resynchronised and raises ValueError.
    """
    path = Path(path)
    kind = annotation_format(path)
    if kind == "parquet":
        yield from _iter_parquet(path)
        return
    with path.open("rb") as f:
        if kind == "json":
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


def _plain(value: Any) -> Any:
    """A Parquet value as the JSON readers would give it (bytes kept): a non-finite float is a
    missing value (pandas writes NaN for one), map entries are ``[key, value]`` lists, dates
    and times ISO text, decimals and anything else their text."""
    if value is None or isinstance(value, (str, bool, int, bytes)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (datetime.date, datetime.time)):  # datetime.datetime is a date
        return value.isoformat()
    if isinstance(value, (decimal.Decimal, datetime.timedelta)):
        return str(value)
    return str(value)


def _iter_parquet(path: Path) -> Iterator[Item]:
    """The rows of a Parquet file, streamed: one record batch of a few rows at a time (with a
    buffered reader, a column chunk is not read whole either)."""
    pq = pyarrow_parquet()
    import pyarrow as pa

    size, index = path.stat().st_size, 0
    try:
        parquet = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
        rows = max(parquet.metadata.num_rows, 1)
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, use_threads=False):
            for row in batch.to_pylist():
                offset = size * (index + 1) // rows
                try:
                    value = _plain(row)
                    if _too_deep(value):
                        raise RecursionError
                except RecursionError:
                    text = f"<row {index}: not kept, nested deeper than {MAX_NESTING} levels>"
                    yield Item(index, text, error=f"nested deeper than {MAX_NESTING} levels", offset=offset)
                else:
                    yield Item(index, value, offset=offset)
                index += 1
    except pa.ArrowException as err:
        raise ValueError(f"{path}: malformed Parquet file at row {index}: {err}") from err


# -- the shuffle's spill file: bytes (Parquet media) travel as base64 ----------------------------
def _bytes_to_text(value: Any, found: list[list[Any]], at: list[Any]) -> Any:
    """``value`` with every bytes value as base64 text; ``found`` collects where they were."""
    if isinstance(value, bytes):
        found.append(list(at))
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {k: _bytes_to_text(v, found, [*at, k]) for k, v in value.items()}
    if isinstance(value, list):
        return [_bytes_to_text(v, found, [*at, i]) for i, v in enumerate(value)]
    return value


def _text_to_bytes(value: Any, found: list[list[Any]]) -> Any:
    for at in found:
        if not at:
            return base64.b64decode(value)
        parent = value
        for step in at[:-1]:
            parent = parent[step]
        parent[at[-1]] = base64.b64decode(parent[at[-1]])
    return value


def shuffled_annotations(path: Path, spill: Path, seed: int) -> Iterator[Item]:
    """The records of ``path`` in a seeded random order, with bounded memory.

    A first pass copies every record as one JSON line into ``spill`` (kept: its byte range); the
    second reads them back in a shuffled order by seeking. Only two integers per record stay in
    memory, and the media, the expensive part, is read once, by the caller.

    Parquet rows go through the spill too, their embedded image bytes as base64 with the list
    of places they were at (so no string of a JSON file is ever taken for bytes). Passing rows by
    (row group, index) instead would not do: Parquet pages are compressed column by column, so a
    row is only read by decoding its whole row group, once per row in a random order.
    """
    ranges: list[tuple[int, int]] = []
    size = path.stat().st_size
    try:
        with spill.open("wb") as out:
            for item in iter_annotations(path):
                start = out.tell()
                found: list[list[Any]] = []
                record = _bytes_to_text(item.record, found, [])
                line = {"index": item.index, "record": record, "error": item.error, "bytes_at": found}
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
                record = _text_to_bytes(line["record"], line["bytes_at"])
                yield Item(line["index"], record, error=line["error"], offset=offset)
    finally:
        spill.unlink(missing_ok=True)
