"""Atomic checkpoint writes: a crash mid-save never leaves a truncated ``.ckpt`` behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from llama2_lightning.checkpoint.safe_load import safe_torch_load


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the same directory, fsync, then ``os.replace`` over the target.
    Loading is always ``weights_only=True``: a checkpoint is data, never code. The temporary file
    is ``.<name>.<random>.tmp``; one a killed run left behind is removed when the next ``fit`` in
    that directory starts (``commands/fit.py``)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            # mkstemp creates the file private (0600); a checkpoint gets the permissions any new file
            # would (0644 under the usual umask), as Lightning's own writer gives it.
            os.fchmod(fd, 0o666 & ~_current_umask())
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path: str | Path, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        # Errors name the path: an empty, truncated or foreign file is a ValueError saying which.
        ckpt = safe_torch_load(path)
        if not isinstance(ckpt, dict):
            raise ValueError(f"{path}: expected a Lightning checkpoint dict, got {type(ckpt).__name__}")
        return ckpt
