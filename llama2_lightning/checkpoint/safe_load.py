"""Reading checkpoint files without executing pickled code."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch


def safe_torch_load(path: Path) -> object:
    """``torch.load`` that only unpickles tensors and plain containers. mmap keeps a 70B shard from
    being read into memory twice; it needs the zip format every torch >= 1.6 writes."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        # torch's message is a page of advice; keep the line that says which global was refused.
        reason = next((ln.strip() for ln in str(err).splitlines() if "WeightsUnpickler error" in ln), str(err))
        raise pickle.UnpicklingError(
            f"{path}: refused to load: the file holds pickled objects other than tensors and plain "
            f"containers, and checkpoints are only loaded with weights_only=True. {reason}"
        ) from None




def require_mapping(obj: object, path: Path) -> Mapping:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj
