"""Reading what a stage logged: its CSV metrics, the last value of one, durations for humans."""

from __future__ import annotations

import csv
from pathlib import Path


def read_metrics(stage_dir: Path) -> list[dict[str, float]]:
    """Every row the stage's ``CSVLogger`` wrote (``<stage>/csv/version_*/metrics.csv``, oldest run
    first, so a resumed stage's rows follow the interrupted run's), empty cells left out."""
    rows: list[dict[str, float]] = []
    def version(path: Path) -> int:  # version_10 after version_9
        number = path.parent.name.removeprefix("version_")
        return int(number) if number.isdigit() else 0

    versions = sorted((stage_dir / "csv").glob("version_*/metrics.csv"), key=version)
    for path in versions:
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                parsed = {}
                for k, v in row.items():
                    if v not in (None, ""):
                        try:
                            parsed[k] = float(v)
                        except ValueError:
                            continue
                rows.append(parsed)
    return rows


def last_value(rows: list[dict[str, float]], metric: str) -> float | None:
    for row in reversed(rows):
        if metric in row:
            return row[metric]
    return None


def format_duration(seconds: float, spaced: bool = False) -> str:
    """``3m11s`` (progress lines), or ``3 min 11 s`` with ``spaced`` (report prose)."""
    m, s = divmod(int(round(seconds)), 60)
    if spaced:
        return f"{m} min {s:02d} s" if m else f"{s} s"
    return f"{m}m{s:02d}s" if m else f"{s}s"
