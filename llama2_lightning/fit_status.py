"""``<default_root_dir>/fit-status.json``: how the last ``fit`` in a directory ended.

Written by :class:`~llama2_lightning.callbacks.RunStatus`; ``{"completed": true, ...}`` only when
training reached its end, ``{"completed": false, "reason": "sigterm", "checkpoint": ...}`` when it
was stopped. The pipeline (and a scheduler's requeue script) reads it; plain JSON, no Lightning.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

STATUS_FILE = "fit-status.json"


def status_path(root: str | os.PathLike[str]) -> Path:
    return Path(root) / STATUS_FILE


def read_status(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The recorded status, or None when there is none (or it is unreadable)."""
    try:
        status = json.loads(status_path(root).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def write_status(root: str | os.PathLike[str], record: dict[str, Any]) -> None:
    path = status_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**record, "time": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2) + "\n")
    os.replace(tmp, path)


__all__ = ["STATUS_FILE", "status_path", "read_status", "write_status"]
