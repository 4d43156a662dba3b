"""Reading annotation files: a ``.json`` array element by element, ``.jsonl`` line by line, or
every record in a seeded random order (two passes through a spill file, bounded memory).
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from mmscene.data.seeds import CONVERT_ORDER, rng_for

_WHITESPACE = re.compile(r"[ \t\n\r]*")
# Guard for the streaming .json parser: one array element larger than this is not a record.
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
            yield from _JsonArrayStream(f, path, chunk_size)
        else:
            yield from _iter_json_lines(f)


def _iter_json_lines(f: BinaryIO) -> Iterator[Item]:
    for lineno, raw in enumerate(f):
        line = raw.lstrip(codecs.BOM_UTF8).strip() if lineno == 0 else raw.strip()
        if not line:
            continue
        try:
            value = json.loads(line.decode("utf-8"))
            if _too_deep(value):
                raise ValueError(f"nested deeper than {MAX_NESTING} levels")
        except (UnicodeDecodeError, ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
            yield Item(lineno, line.decode("utf-8", "replace"), error=str(err), offset=f.tell())
            continue
        yield Item(lineno, value, offset=f.tell())


class _JsonArrayStream:
    """Incremental parser for ``[ {...}, {...} ]``: ``raw_decode`` over a sliding text buffer."""

    def __init__(self, f: BinaryIO, path: Path, chunk_size: int):
        self.f, self.path, self.chunk_size = f, path, chunk_size
        self.utf8 = codecs.getincrementaldecoder("utf-8-sig")()
        self.decoder = json.JSONDecoder()
        self.buf, self.pos, self.eof = "", 0, False

    def _fill(self, size: int) -> None:
        data = self.f.read(size)
        self.eof = not data
        # drop what is consumed so the buffer holds about one element, not the file
        self.buf = self.buf[self.pos :] + self.utf8.decode(data, final=self.eof)
        self.pos = 0

    def _peek(self) -> str:
        """The next non-whitespace character, '' at the end of the file."""
        while True:
            self.pos = _WHITESPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if self.eof:
                return ""
            self._fill(self.chunk_size)

    def _fail(self, index: int, msg: str) -> ValueError:
        return ValueError(f"{self.path}: malformed JSON array at element {index}: {msg}")

    def __iter__(self) -> Iterator[Item]:
        if self._peek() != "[":
            raise self._fail(0, "file does not start with '['")
        self.pos += 1
        index = 0
        while True:
            char = self._peek()
            if char == "]":
                self.pos += 1
                if self._peek() != "":
                    raise self._fail(index, "data after the closing ']'")
                return
            if index > 0:
                if char != ",":
                    raise self._fail(index, f"expected ',' or ']', found {char!r}")
                self.pos += 1
            start = self.pos
            value = self._value(index)
            # bytes consumed so far (characters still buffered counted as bytes: close enough)
            offset = self.f.tell() - (len(self.buf) - self.pos)
            if _too_deep(value):
                text = self.buf[start : self.pos]
                yield Item(index, text, error=f"nested deeper than {MAX_NESTING} levels", offset=offset)
            else:
                yield Item(index, value, offset=offset)
            index += 1

    def _value(self, index: int) -> Any:
        size = self.chunk_size
        while True:
            if self._peek() == "":
                raise self._fail(index, "unexpected end of file")
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
                # a value ending exactly at the buffer's end might continue (a number): read on
                if end < len(self.buf) or self.eof:
                    self.pos = end
                    return value
            except RecursionError as err:
                raise self._fail(index, "nested too deeply to parse") from err
            except json.JSONDecodeError as err:
                if self.eof:
                    raise self._fail(index, str(err)) from err
                if len(self.buf) - self.pos > MAX_ELEMENT_CHARS:
                    raise self._fail(index, f"element larger than {MAX_ELEMENT_CHARS} characters") from err
            # incomplete element: read more, doubling so a huge element is not re-parsed too often
            self._fill(size)
            size *= 2


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
