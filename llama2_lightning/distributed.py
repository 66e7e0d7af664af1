"""FSDP2 sharding for the Transformer (``torch.distributed.fsdp.fully_shard``).

One FSDP unit per ``TransformerBlock`` plus the root (embeddings, final norm, output), so at most one
block's full weights are gathered at a time. The same code runs on CPU (gloo) and GPU (NCCL) under
Lightning's ``ModelParallelStrategy``, which calls this from ``configure_model``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from llama2_lightning.dtypes import resolve_dtype
from llama2_lightning.model import Transformer


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D data-parallel sub-mesh of Lightning's (data_parallel, tensor_parallel) mesh."""
    if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names:
        return mesh["data_parallel"]
    return mesh


def shard_transformer(model: Transformer, mesh: DeviceMesh, param_dtype: str | None = None,
                      reduce_dtype: str | None = "float32", reshard_after_forward: bool = True) -> Transformer:
    """Apply ``fully_shard`` per block and to the root. ``param_dtype="bfloat16"`` computes in bf16
    while the sharded master weights stay in their own dtype; gradients reduce in ``reduce_dtype``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dp_mesh = data_parallel_mesh(mesh)
    policy = MixedPrecisionPolicy(param_dtype=resolve_dtype(param_dtype), reduce_dtype=resolve_dtype(reduce_dtype))
    for block in model.layers:
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def local_numel(module: nn.Module) -> int:
    """Parameters held by this rank (the local shard of each DTensor)."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in module.parameters())


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Hold an FSDP2-sharded model's full weights for the duration (no-op when unsharded).

    Token-by-token generation runs one forward per new token; sharded, each would all-gather every
    block's weights again (the paper measured naive FSDP generation ~20x slower), and ranks whose
    rows all hit EOS early would stop calling forward and leave the others waiting in a collective.
    Gathering once up front makes every generation forward local.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)
