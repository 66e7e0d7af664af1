"""Reading checkpoints without executing pickled code.

Single files go through ``torch.load(weights_only=True)``. Sharded (``torch.distributed.checkpoint``)
directories need more: torch's ``FileSystemReader.read_metadata`` reads ``<dir>/.metadata`` with plain
``pickle.load``, and its ``DefaultLoadPlanner.load_bytes`` unpickles every non-tensor entry (optimizer
hyper-parameters) with ``weights_only=False``, so a crafted directory runs whatever its pickles ask
for. Here the metadata is read by an unpickler that can build only what torch's writer puts there
(its metadata dataclasses, tensor sizes, dtypes, layouts, memory formats, relative paths), and
non-tensor entries with ``weights_only=True``. :func:`safe_dcp_loading` makes torch's own classes do
the same for the duration of a block: that is how Lightning's strategies, which build their own
reader, load ``fit --ckpt_path DIR`` safely.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import pathlib
import pickle
import re
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._nested_dict import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
    """A checkpoint asks to build an object no checkpoint needs: loading it would run its code.
    A ``ValueError`` too, so every command's handler for bad input reports it in one line."""


class CheckpointReadError(ValueError):
    """A checkpoint file that cannot be read: empty, truncated, or not a checkpoint at all."""


_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def safe_torch_load(path: Path) -> object:
    """``torch.load`` that only unpickles tensors and plain containers; every failure names ``path``.
    mmap keeps a 70B shard from being read into memory twice; it needs the zip format every
    torch >= 1.6 writes."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointReadError(f"{path}: the file is empty (0 bytes), not a checkpoint (an interrupted copy?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (FileNotFoundError, IsADirectoryError):
        raise
    except Exception as err:  # noqa: BLE001 - corrupt bytes make the unpickler raise almost anything
        refused = _REFUSED_GLOBAL.search(str(err))
        if refused:
            # Only the refused name: torch's advice to retry with weights_only=False is what must not be done.
            raise UnsafeCheckpointError(
                f"{path}: refused to load: the file asks to build {refused.group(1)}; checkpoints hold only "
                "tensors and plain containers and are read with weights_only=True, never by running pickled code"
            ) from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else "no detail"
        raise CheckpointReadError(f"{path}: not a readable checkpoint: truncated, corrupt or not a torch file "
                                  f"({type(err).__name__}: {first})") from None


def require_mapping(obj: object, path: Path) -> Mapping:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


# ---------------------------------------------------------------------------------------------- sharded directories
METADATA_FILE = ".metadata"


# Everything torch's FileSystemWriter pickles into `.metadata` besides the classes of
# torch.distributed.checkpoint.metadata (checked against torch 2.13's writer).
_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch", "Size"): torch.Size,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): dcp_filesystem._StorageInfo,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,  # a name -> torch.layout lookup
    ("pathlib", "PosixPath"): pathlib.PurePosixPath,  # relative shard names; pure paths never touch the disk
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
    ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,
    ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, source: Path) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        found = getattr(dcp_metadata, name, None) if module == dcp_metadata.__name__ else None
        # Only the metadata classes defined there, not what that module imports (Enum, typing names).
        if isinstance(found, type) and found.__module__ == dcp_metadata.__name__ and not name.startswith("__"):
            return found
        raise UnsafeCheckpointError(
            f"{self.source}: refused to load: this sharded checkpoint's metadata asks to call {module}.{name}, "
            "which torch's checkpoint metadata never contains (the directory may have been crafted to run "
            "code when loaded); nothing from it was executed"
        )


def read_dcp_metadata(directory: str | os.PathLike[str], filename: str = METADATA_FILE) -> Metadata:
    """The ``Metadata`` of a sharded checkpoint directory, unpickled with the allow-list above."""
    source = Path(directory) / filename
    if not source.is_file():
        raise FileNotFoundError(f"{directory}: no {filename} file: not a sharded (torch.distributed.checkpoint) "
                                "checkpoint directory")
    try:
        metadata = _MetadataUnpickler(io.BytesIO(source.read_bytes()), source).load()
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - truncated or random bytes make pickle raise almost anything
        raise ValueError(f"{source}: unreadable sharded-checkpoint metadata, truncated or corrupt "
                         f"({type(err).__name__}: {err})") from None
    if not isinstance(metadata, Metadata):
        raise ValueError(f"{source}: expected torch.distributed.checkpoint Metadata, got {type(metadata).__name__}")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose metadata comes from :func:`read_dcp_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        filename = METADATA_FILE if rank is None else f"__{rank}{METADATA_FILE}"
        metadata = read_dcp_metadata(self.path, filename)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _load_bytes_weights_only(self: DefaultLoadPlanner, read_item: Any, value: io.BytesIO) -> None:
    # As torch's DefaultLoadPlanner.load_bytes, but weights_only: non-tensor entries are numbers,
    # strings and containers (learning rates, betas, parameter ids), never objects with code.
    obj = torch.load(value, weights_only=True)
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
    else:
        self.state_dict[read_item.dest_index.fqn] = obj


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that reads non-tensor entries with ``weights_only=True``."""

    load_bytes = _load_bytes_weights_only


@contextlib.contextmanager
def safe_dcp_loading() -> Iterator[None]:
    """Inside the block every ``torch.distributed.checkpoint`` load in this process reads metadata
    with :func:`read_dcp_metadata` and non-tensor entries with ``weights_only=True``, including the
    readers and planners Lightning's strategies create themselves."""
    saved = FileSystemReader.read_metadata, DefaultLoadPlanner.load_bytes
    FileSystemReader.read_metadata = SafeFileSystemReader.read_metadata  # type: ignore[method-assign]
    DefaultLoadPlanner.load_bytes = _load_bytes_weights_only  # type: ignore[method-assign]
    try:
        yield
    finally:
        FileSystemReader.read_metadata, DefaultLoadPlanner.load_bytes = saved  # type: ignore[method-assign]


def load_dcp_tensors(directory: str | os.PathLike[str], top_key: str) -> dict[str, torch.Tensor]:
    """The tensors saved under ``top_key`` (``"state_dict"``) of a sharded checkpoint, gathered into
    this process; an entry under it that is not a tensor is an error (weights are never pickles)."""
    directory = Path(directory)
    metadata = read_dcp_metadata(directory)
    prefix = top_key + "."
    state: dict[str, torch.Tensor] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if not fqn.startswith(prefix):
            continue
        if not isinstance(md, dcp_metadata.TensorStorageMetadata):
            raise ValueError(f"{directory / METADATA_FILE}: {fqn} is stored as {type(md).__name__}, not a tensor: "
                             "not a sharded checkpoint written by Lightning")
        state[fqn[len(prefix):]] = torch.empty(md.size, dtype=md.properties.dtype)
    if not state:
        raise ValueError(f"{directory}: the sharded checkpoint has no tensors under {top_key!r}")
    nested = {top_key: state}
    dcp.load(nested, storage_reader=SafeFileSystemReader(directory),
                                      planner=SafeLoadPlanner())
    return nested[top_key]


__all__ = ["CheckpointReadError", "UnsafeCheckpointError", "safe_torch_load", "require_mapping", "read_dcp_metadata",
           "SafeFileSystemReader", "SafeLoadPlanner", "safe_dcp_loading", "load_dcp_tensors", "METADATA_FILE"]
