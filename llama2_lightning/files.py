"""Input file lists: glob patterns expanded in sorted order (so streams are reproducible), every file checked."""

from __future__ import annotations

import glob
from collections.abc import Iterable
from pathlib import Path


def expand_files(patterns: Iterable[str | Path], pattern_label: str, missing_label: str) -> list[Path]:
    """Expand ``patterns`` (plain paths or globs); errors read ``"{pattern_label} {pattern!r} matched no
    files"`` and ``"{missing_label}: {path}"`` so each caller names its own setting."""
    files: list[Path] = []
    for item in patterns:
        pattern = str(item)
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise FileNotFoundError(f"{pattern_label} {pattern!r} matched no files")
            files.extend(Path(m) for m in matches)
        else:
            files.append(Path(pattern))
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{missing_label}: {path}")
    return files
