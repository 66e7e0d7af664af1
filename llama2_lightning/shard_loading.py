"""Materialise a model built on the meta device, each rank reading only its own slice of the weights.

The training modules build every model under ``torch.device("meta")`` (no storage), shard it with FSDP2,
and only then give it memory: ``to_empty`` allocates this rank's shard of each parameter, and
:func:`materialize` copies that shard out of the checkpoint's tensors. Checkpoint tensors come from
``torch.load(mmap=True)`` (or per-key readers), so slicing a row range touches only those pages of the
file: a rank's host memory grows with its shard, not with the model. The copy casts into the
parameter's own dtype, so master weights stay in the dtype the model was built in (float32, or what the
precision plugin chose) whatever dtype the checkpoint holds (Meta and Hugging Face release bf16/fp16).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from llama2_lightning.checkpoint.safe_load import SafeFileSystemReader, SafeLoadPlanner


def local_slice(full: Tensor, target: Tensor) -> Tensor:
    """The part of ``full`` (the whole tensor) that ``target`` holds on this rank: for a DTensor the
    block its placements give this rank (FSDP2's ``Shard(0)`` rows, or any tensor-parallel layout),
    for a plain tensor all of it."""
    if tuple(full.shape) != tuple(target.shape):
        raise ValueError(f"shape {tuple(full.shape)} in the checkpoint, expected {tuple(target.shape)}")
    if not isinstance(target, DTensor):
        return full if isinstance(full, Tensor) else full[(slice(None),) * len(full.shape)]  # a lazy MetaWeight
    shape, offset = compute_local_shape_and_global_offset(full.shape, target.device_mesh, target.placements)
    return full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]


def has_meta_tensors(module: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))


def _named_tensors(module: nn.Module) -> dict[str, Tensor]:
    # every name a tied parameter goes by (an output layer tied to the embeddings) is a valid key
    return dict(itertools.chain(module.named_parameters(remove_duplicate=False), module.named_buffers()))


def _tied_groups(module: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """(module, attribute) pairs that hold one shared parameter, for each parameter shared by several."""
    groups: dict[int, list[tuple[nn.Module, str]]] = {}
    for sub in module.modules():
        for name, p in sub.named_parameters(recurse=False):
            groups.setdefault(id(p), []).append((sub, name))
    return [g for g in groups.values() if len(g) > 1]


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def materialize(module: nn.Module, device: torch.device | str, state_dict: Mapping[str, Tensor] | None = None,
                source: str = "state_dict") -> None:
    """Give ``module`` storage on ``device`` (if any of it is still on meta) and fill it: every parameter
    and persistent buffer named in ``state_dict`` receives this rank's slice, cast to its own dtype; each
    submodule owning a tensor that is not in ``state_dict`` (a new reward head, the RoPE table) runs its
    ``reset_parameters``. ``state_dict`` keys must all belong to ``module`` (``source`` names the file in
    the error)."""
    state_dict = state_dict or {}
    unexpected = sorted(set(state_dict) - set(_named_tensors(module)))
    if unexpected:
        raise ValueError(f"{source}: tensors that the model does not have: {', '.join(unexpected[:8])}"
                         + (f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else ""))
    if has_meta_tensors(module):
        tied = _tied_groups(module)
        module.to_empty(device=device)  # FSDP2 re-points its sharded parameters at the new storage
        for (owner, attr), *others in tied:  # to_empty gives each name its own tensor: tie them again
            for sub, name in others:
                setattr(sub, name, getattr(owner, attr))
    # Initialise what the checkpoint lacks first, so that a partly loaded module keeps the loaded part.
    for prefix, sub in module.named_modules():
        mine = [n for n, t in itertools.chain(sub.named_parameters(recurse=False), sub.named_buffers(recurse=False))
                if t.numel() > 0]  # an empty placeholder (a dropped LM head's) holds nothing to load
        if all((f"{prefix}.{n}" if prefix else n) in state_dict for n in mine):
            continue
        reset = getattr(sub, "reset_parameters", None)
        if reset is None:
            raise ValueError(f"{source}: no weights for {prefix or type(module).__name__} "
                             f"({type(sub).__name__}, which has no reset_parameters)")
        reset()
    for name, tensor in _named_tensors(module).items():  # after to_empty: the new tensors
        if name in state_dict:
            try:
                piece = local_slice(state_dict[name], tensor)
            except ValueError as err:
                raise ValueError(f"{source}: tensor {name}: {err}") from None
            _local(tensor).copy_(piece)  # reads only this rank's rows of a memory-mapped checkpoint


def load_distributed(module: nn.Module, path: str | os.PathLike[str], prefix: str = "model.") -> None:
    """Fill a materialised, sharded ``module`` from a ``torch.distributed.checkpoint`` directory (what
    Lightning's ``ModelParallelStrategy`` saves): each rank reads its own shards, nothing is gathered.
    The module's weights are the entries of the checkpoint's ``state_dict`` under ``prefix``."""
    targets = {f"{prefix}{name}": t for name, t in module.state_dict().items()}
    # The safe reader and planner: a crafted directory's pickled metadata never runs (issue #14).
    dcp.load({"state_dict": targets}, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner())


def materialization_device(mesh: object | None) -> torch.device:
    """Where this rank's shard lives: the mesh's device on this rank, else the current default device
    (Lightning's single-device strategies set it around ``configure_model``)."""
    if mesh is None:
        return torch.get_default_device()
    device_type = mesh.device_type  # type: ignore[attr-defined]
    if device_type == "cpu":
        return torch.device("cpu")
    return torch.device(device_type, torch.accelerator.current_device_index())


def device_mesh_of(module: nn.Module) -> object | None:
    """The mesh ``module``'s parameters are sharded over, or ``None`` for a plain module."""
    return next((p.device_mesh for p in module.parameters() if isinstance(p, DTensor)), None)
