"""FSDP2 sharding for the Transformer (``torch.distributed.fsdp.fully_shard``).

One FSDP unit per ``TransformerBlock`` plus the root (embeddings, final norm, output), so at most one
block's full weights are gathered at a time. The same code runs on CPU (gloo) and GPU (NCCL) under
Lightning's ``ModelParallelStrategy``, which calls this from ``configure_model``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from llama2_lightning.dtypes import resolve_dtype
from llama2_lightning.model import Transformer
from llama2_lightning.scalar_model import ScalarModel
from llama2_lightning.tensor_parallel import parallelize_scalar_model, parallelize_transformer


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D data-parallel sub-mesh of Lightning's (data_parallel, tensor_parallel) mesh."""
    if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names:
        return mesh["data_parallel"]
    return mesh


def shard_transformer(model: Transformer, mesh: DeviceMesh, param_dtype: str | None = None,
                      reduce_dtype: str | None = "float32", reshard_after_forward: bool = True,
                      float32_outputs: bool = False) -> Transformer:
    """Apply ``fully_shard`` per block and to the root. ``param_dtype="bfloat16"`` computes in bf16
    while the sharded master weights stay in their own dtype; gradients reduce in ``reduce_dtype``."""
    dp_mesh = data_parallel_mesh(mesh)
    policy = MixedPrecisionPolicy(param_dtype=resolve_dtype(param_dtype), reduce_dtype=resolve_dtype(reduce_dtype))
    # A block's floating-point inputs are the hidden states, already in the compute dtype (the root's
    # embedding computed them), and the float32 RoPE table, which a bf16 cast would ruin
    block_policy = MixedPrecisionPolicy(param_dtype=policy.param_dtype, reduce_dtype=policy.reduce_dtype,
                                        cast_forward_inputs=False)
    for block in model.layers:
        fully_shard(block, mesh=dp_mesh, mp_policy=block_policy, reshard_after_forward=reshard_after_forward)
    # float32_outputs: logits for the losses (a language model); not for a trunk whose hidden states go
    # on to a head in the compute dtype (ScalarModel)
    fully_shard(model, mesh=dp_mesh, mp_policy=root_policy(param_dtype, reduce_dtype) if float32_outputs else policy,
                reshard_after_forward=reshard_after_forward)
    return model


def root_policy(param_dtype: str | None, reduce_dtype: str | None) -> MixedPrecisionPolicy:
    """The root unit's policy: like the blocks', and with bf16 compute its outputs (logits, a head's
    scores) come back in float32, which the losses and PPO's probability ratios need."""
    compute = resolve_dtype(param_dtype)
    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=resolve_dtype(reduce_dtype),
                                output_dtype=torch.float32 if compute is not None else None)


def shard_scalar_model(model: nn.Module, mesh: DeviceMesh, param_dtype: str | None = None,
                       reduce_dtype: str | None = "float32") -> nn.Module:
    """Shard a ``ScalarModel`` (reward or value model): the trunk as :func:`shard_transformer` does, and
    a root unit that owns the head, so that the head's gradient is reduced across ranks too."""
    shard_transformer(model.trunk, mesh, param_dtype, reduce_dtype)
    # ScalarModel calls trunk.forward_hidden and PPO calls forward_all: FSDP2 hooks only forward(),
    # so both units must gather on these methods too.
    register_fsdp_forward_method(model.trunk, "forward_hidden")
    fully_shard(model, mesh=data_parallel_mesh(mesh), mp_policy=root_policy(param_dtype, reduce_dtype))
    register_fsdp_forward_method(model, "forward_all")
    return model


def shard_for_training(model: nn.Module, mesh: DeviceMesh, param_dtype: str | None = None,
                       reduce_dtype: str | None = "float32") -> nn.Module:
    """The layout every stage holds a model in over Lightning's (data_parallel, tensor_parallel) mesh:
    split over the TP dimension first (a no-op at size 1), then FSDP2 over the data-parallel one, which
    shards the TP shards. A ``ScalarModel`` (reward, value) or a language model (float32 logits). The
    builders of the stage modules and the ``memory`` command both call this, so the estimate counts
    the shards training allocates."""
    if isinstance(model, ScalarModel):
        parallelize_scalar_model(model, mesh)
        return shard_scalar_model(model, mesh, param_dtype, reduce_dtype)
    parallelize_transformer(model, mesh)
    return shard_transformer(model, mesh, param_dtype, reduce_dtype, float32_outputs=True)


def fits_gathered(full_bytes: int, budget_bytes: int | None) -> bool:
    """Whether a model of ``full_bytes`` unsharded may be gathered whole for generation; ``None``: no
    limit known (CPU)."""
    return budget_bytes is None or full_bytes <= budget_bytes


# Share of the free accelerator memory a gathered policy may take; the rest is the KV cache's and the
# sampler's. `memory_estimate` applies the same rule to predict whether a config's rollouts gather.
GATHER_FRACTION = 0.5


def gather_budget(device: torch.device) -> int | None:
    """Bytes a model may take gathered whole on ``device``: a share of what is free there now."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * GATHER_FRACTION)


def is_sharded(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def local_numel(module: nn.Module) -> int:
    """Parameters held by this rank (the local shard of each DTensor)."""
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in module.parameters())


def _gathered_numel(p: torch.Tensor) -> int:
    if not isinstance(p, DTensor):
        return p.numel()
    names = p.device_mesh.mesh_dim_names or ()
    placements = [Replicate() if name == "data_parallel" else pl for name, pl in zip(names, p.placements)]
    shape, _ = compute_local_shape_and_global_offset(p.shape, p.device_mesh, placements)
    return math.prod(shape)


def gathered_numel(module: nn.Module) -> int:
    """Elements of ``module``'s parameters once FSDP2 has all-gathered them over the data-parallel
    dimension: the whole parameter without tensor parallelism, this rank's tensor-parallel shard with it
    (each DTensor's block with its data-parallel placement made ``Replicate()``, torch's own layout
    arithmetic). What :func:`gathered` allocates, and one FSDP2 unit's footprint while it computes."""
    return sum(_gathered_numel(p) for p in module.parameters())


def gathered_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of ``model``'s parameters gathered over the data-parallel dimension (:func:`gathered_numel`)
    in ``dtype`` (default: each parameter's own): under tensor parallelism only the TP shard is ever
    gathered, so 70B at TP 8 gathers 1/8 of its weights (17 GB in bf16), not the 138 GB of the whole."""
    return sum(_gathered_numel(p) * torch.empty(0, dtype=dtype or p.dtype).element_size()
               for p in model.parameters())


def _compute_dtype(unit: FSDPModule) -> torch.dtype | None:
    # FSDP2 exposes no getter for a unit's policy; None (the parameters' own dtype) if this moves
    policy = getattr(getattr(unit, "_get_fsdp_state", lambda: None)(), "_mp_policy", None)
    return getattr(policy, "param_dtype", None)


@contextlib.contextmanager
def gathered(model: nn.Module, budget_bytes: int | None = -1) -> Iterator[bool]:
    """Hold an FSDP2-sharded model's full weights for the duration, when they fit; yields whether it did
    (no-op, ``False``, when unsharded).

    Token-by-token generation runs one forward per new token; sharded, each all-gathers every block's
    weights again (the paper measured naive FSDP generation ~20x slower), so gathering once up front
    makes every generation forward local. That needs the whole model in the compute dtype on every
    GPU (70B: 138 GB in bf16, more than one GPU holds), or under tensor parallelism this rank's TP
    shard of it (:func:`gathered_bytes`; the TP split is never undone), so it is gathered only when it fits
    ``budget_bytes`` (default, -1: :data:`GATHER_FRACTION` of the free accelerator memory; ``None``: no
    limit). Otherwise it stays sharded and :func:`llama2_lightning.generation.generate` decodes in
    lockstep across ranks, gathering one block at a time.
    """
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield False
        return
    if budget_bytes == -1:
        budget_bytes = gather_budget(next(model.parameters()).device)
    compute = _compute_dtype(units[0])
    if not fits_gathered(gathered_bytes(model, compute), budget_bytes):
        yield False
        return
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield True
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)
