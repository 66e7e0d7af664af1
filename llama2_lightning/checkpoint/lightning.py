"""Lightning ``.ckpt`` files and sharded checkpoint directories written by this package's modules."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from llama2_lightning.checkpoint.safe_load import (
    METADATA_FILE,
    load_dcp_tensors,
    read_dcp_metadata,
    require_mapping,
    safe_torch_load,
)
from llama2_lightning.checkpoint.state_dict import StateDict, check_state_dict, expected_shapes, require_tensor_dict
from llama2_lightning.config import LlamaConfig


def load_lightning(path: str | os.PathLike[str], prefix: str = "model.") -> tuple[LlamaConfig, StateDict]:
    """Read a ``.ckpt`` written by this package's LightningModules: the Transformer's weights are the
    ``state_dict`` entries under ``prefix`` and its config is the plain dict ``llama_config``.
    Entries under other prefixes (``ref_model.``, ``value_head.``...) belong to other submodules."""
    path = Path(path)
    if path.is_dir():
        ckpt = consolidate_sharded(path)
    elif not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    else:
        ckpt = safe_torch_load(path)
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path}: expected a Lightning checkpoint dict, got {type(ckpt).__name__}")
    for key in ("state_dict", "llama_config"):
        if key not in ckpt:
            raise ValueError(
                f"{path}: Lightning checkpoint has no {key!r} entry (keys: {sorted(ckpt)}); "
                "it was not written by a llama2-lightning module"
            )
    if not isinstance(ckpt["llama_config"], Mapping):
        raise ValueError(f"{path}: 'llama_config' should be a dict (LlamaConfig.to_dict()), "
                         f"got {type(ckpt['llama_config']).__name__}")
    config = LlamaConfig.from_dict(dict(ckpt["llama_config"]))
    full = require_tensor_dict(ckpt["state_dict"], path, "'state_dict'")
    state_dict = {name[len(prefix):]: t for name, t in full.items() if name.startswith(prefix)}
    if not state_dict:
        prefixes = sorted({name.split(".", 1)[0] + "." for name in full})
        raise ValueError(f"{path}: no weights under prefix {prefix!r}; the state_dict has prefixes {prefixes}")
    check_state_dict(expected_shapes(config), state_dict, f"{path} (prefix {prefix!r})")
    return config, state_dict


def save_lightning(config: LlamaConfig, state_dict: Mapping[str, Tensor], path: str | os.PathLike[str],
                   prefix: str = "model.") -> None:
    """A ``.ckpt`` that :func:`load_lightning` and every module's ``init_from`` read: the weights under
    ``prefix`` and the config as ``llama_config`` (no optimiser state: a starting point, not a resume)."""
    check_state_dict(expected_shapes(config), state_dict, "state dict to save")
    tensors = {prefix + name: t.detach().clone(memory_format=torch.contiguous_format) for name, t in state_dict.items()}
    torch.save({"state_dict": tensors, "llama_config": config.to_dict()}, Path(path))


def consolidate_sharded(path: Path) -> dict[str, object]:
    """Gather a sharded checkpoint directory written by Lightning's ``ModelParallelStrategy``
    (``torch.distributed.checkpoint`` shards of ``state_dict`` + ``meta.pt`` with the rest) into one
    dict in this process, reading only the model weights (not the optimizer shards). Nothing in the
    directory is unpickled beyond tensors, containers and torch's metadata classes (:mod:`.safe_load`)."""
    if not (path / METADATA_FILE).is_file() or not (path / "meta.pt").is_file():
        raise ValueError(
            f"{path} is a directory but not a sharded Lightning checkpoint (expected .metadata and meta.pt in it)"
        )
    read_dcp_metadata(path)  # refuses a crafted directory before anything else in it is read
    ckpt = dict(require_mapping(safe_torch_load(path / "meta.pt"), path / "meta.pt"))
    ckpt["state_dict"] = load_dcp_tensors(path, "state_dict")
    return ckpt


def read_checkpoint_state(path: str | os.PathLike[str]) -> Mapping:
    """The non-tensor state of a Lightning checkpoint (callbacks, loops, hyperparameters, configs)
    without reading its weights: a ``.ckpt`` file (mmap'd), or the ``meta.pt`` of a sharded directory
    written by ``ModelParallelStrategy``, whose tensors sit in DCP shards beside it. Loaded safely
    (:mod:`.safe_load`); errors name the path and what was expected."""
    path = Path(path)
    if path.is_dir():
        meta = path / "meta.pt"
        if not (path / METADATA_FILE).is_file() or not meta.is_file():
            raise ValueError(f"{path} is a directory but not a sharded Lightning checkpoint (expected "
                             f"{METADATA_FILE} and meta.pt in it)")
        read_dcp_metadata(path)  # refuses a crafted directory before anything else in it is read
        return require_mapping(safe_torch_load(meta), meta)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint (a .ckpt file or a sharded checkpoint directory)")
    return require_mapping(safe_torch_load(path), path)


def checkpoint_problem(path: str | os.PathLike[str]) -> str | None:
    """Why a Lightning checkpoint (file or sharded directory) cannot be resumed from, or None when it
    reads: the cheap part of a load (mmap'd; the tensors are not read)."""
    path = Path(path)
    try:
        if path.is_dir():
            read_dcp_metadata(path)
            path = path / "meta.pt"
        ckpt = safe_torch_load(path)
    except (OSError, ValueError) as err:
        return str(err)
    if not isinstance(ckpt, Mapping) or ("loops" not in ckpt and "state_dict" not in ckpt):
        return f"{path}: not a Lightning training checkpoint"
    return None
