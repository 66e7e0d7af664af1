"""The checks every data module's ``sources`` list shares: a list of dicts with known keys, a path, an
allowed format, and optional ``is_safety`` / ``limit`` / ``name``. Errors name the entry
(``sources[2].format``), the key and what was expected."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama2_lightning.mapping_checks import check_entry


@dataclass
class SourceEntry:
    """One validated entry: the common fields, plus ``where`` and the raw dict for format-specific keys."""

    where: str  # "sources[2]", for error messages
    raw: Mapping[str, Any]
    path: Path
    format: str
    is_safety: bool | None
    limit: int | None
    name: str


def source_entries(sources: Sequence[Mapping[str, Any]], key: str, allowed_keys: Sequence[str],
                   formats: Sequence[str], default_format: str) -> Iterator[SourceEntry]:
    """Validate the shared part of each entry of a config's ``sources`` list, in order."""
    if isinstance(sources, (str, Mapping)) or not isinstance(sources, Sequence):
        raise ValueError(f"{key} must be a list of dicts like {{path: ..., format: {default_format}}}, got {sources!r}")
    for i, entry in enumerate(sources):
        where = f"{key}[{i}]"
        entry = check_entry(entry, where, allowed_keys, "a dict with a 'path'")
        if not isinstance(entry.get("path"), (str, Path)) or not str(entry["path"]):
            raise ValueError(f"{where}.path is required: a JSONL file (plain or .gz) or a CSV")
        fmt = entry.get("format", default_format)
        if fmt not in formats:
            raise ValueError(f"{where}.format is {fmt!r}; allowed: {', '.join(formats)}")
        is_safety = entry.get("is_safety")
        if is_safety is not None and not isinstance(is_safety, bool):
            raise ValueError(f"{where}.is_safety must be true, false or null, got {is_safety!r}")
        limit = entry.get("limit")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"{where}.limit must be an integer >= 1 or null, got {limit!r}")
        path = Path(entry["path"])
        yield SourceEntry(where, entry, path, str(fmt), is_safety, limit, str(entry.get("name") or path.name.split(".")[0]))


__all__ = ["SourceEntry", "source_entries"]
