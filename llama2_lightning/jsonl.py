"""The one JSONL reader: plain or gzip files, ``(line, record)`` pairs, errors that name the file and line."""

from __future__ import annotations

import gzip
import json
import os
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal


class JsonlReader(Iterator[tuple[int, dict[str, Any]]]):
    """Iterator over ``(line_number, record)`` of a plain or gzip JSONL file.

    Line numbers are 1-based; blank lines are skipped silently. A line that is not a JSON object
    raises ``ValueError("<path>:<line>: ...")`` with ``on_bad_line="error"``; with ``"skip"`` it is
    counted in ``skipped`` (and listed in ``skipped_lines``) so the caller can report how much data
    was lost.
    """

    def __init__(self, path: str | Path, on_bad_line: Literal["error", "skip"] = "error") -> None:
        if on_bad_line not in ("error", "skip"):
            raise ValueError(f"on_bad_line must be 'error' or 'skip', got {on_bad_line!r}")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"JSONL file not found: {self.path}")
        self.on_bad_line = on_bad_line
        self.skipped = 0
        self.skipped_lines: list[int] = []
        self._lines = self._read()

    def __iter__(self) -> JsonlReader:
        return self

    def __next__(self) -> tuple[int, dict[str, Any]]:
        return next(self._lines)

    def _open(self) -> Any:
        # Sniff the gzip magic rather than trusting the suffix, so renamed files still work.
        with open(self.path, "rb") as f:
            magic = f.read(2)
        return gzip.open(self.path, "rb") if magic == b"\x1f\x8b" else open(self.path, "rb")

    def _bad(self, lineno: int, why: str) -> None:
        if self.on_bad_line == "error":
            raise ValueError(f"{self.path}:{lineno}: {why}")
        self.skipped += 1
        self.skipped_lines.append(lineno)

    def _read(self) -> Iterator[tuple[int, dict[str, Any]]]:
        with self._open() as f:
            lineno = 0
            try:
                # Bytes, decoded per line, so a bad encoding is reported with its line number.
                for lineno, raw in enumerate(f, start=1):
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        self._bad(lineno, f"not valid UTF-8 ({e})")
                        continue
                    if not line.strip():
                        continue
                    try:
                        # Without the line ending, so an error at the end of the line reports its column.
                        record = json.loads(line.rstrip("\r\n"))
                    except json.JSONDecodeError as e:
                        self._bad(lineno, f"malformed JSON ({e.msg} at column {e.colno})")
                        continue
                    if not isinstance(record, dict):
                        self._bad(lineno, f"expected a JSON object, got {type(record).__name__}")
                        continue
                    yield lineno, record
            except (OSError, EOFError, zlib.error) as e:
                # A truncated or corrupt gzip stream: say where reading stopped.
                raise ValueError(f"{self.path}: unreadable after line {lineno}: {e}") from e


def read_jsonl(
    path: str | Path, on_bad_line: Literal["error", "skip"] = "error"
) -> JsonlReader:
    """``(line_number, record)`` pairs of a plain or .gz JSONL file; see :class:`JsonlReader`."""
    return JsonlReader(path, on_bad_line)


def text_records(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line_number, text)`` of a JSONL corpus whose records are ``{"text": str, ...}``; a record
    without a string ``text`` is an error naming the file and line."""
    for lineno, record in read_jsonl(path):
        if not isinstance(record.get("text"), str):
            raise ValueError(f"{path}:{lineno}: expected a JSON object with a string 'text' field")
        if "\x00" in record["text"]:
            raise ValueError(f"{path}:{lineno}: the 'text' holds NUL characters (binary data, not text)")
        yield lineno, record["text"]


def write_jsonl_atomic(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Write ``records`` one per line to ``path`` through a temporary file renamed over it, so a reader never
    sees a half-written file and an interrupted run leaves the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
