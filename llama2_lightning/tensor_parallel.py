"""Tensor parallelism for the Transformer: Megatron-style column/row splits through torch's DTensor.

Meta trained and sampled Llama 2 70B with 8-way model parallelism (its release is 8 shards). Each
block's attention splits by heads: ``wq wk wv`` column-wise (rank r holds query heads
``r*H/tp .. (r+1)*H/tp - 1`` and the matching KV heads, so grouped-query attention stays local),
``wo`` row-wise; the SwiGLU splits its hidden width: ``w1 w3`` column-wise, ``w2`` row-wise. One block
then costs two all-reduces forward (after ``wo`` and ``w2``) and two backward, and each rank's KV
cache holds only its own heads. The embedding table and the LM head are split on the vocabulary;
the LM head's logits stay sharded on the vocabulary (a ``DTensor``) for ``torch.distributed.tensor.
parallel.loss_parallel``, so the (B, T, V) logits are never gathered for the training loss.

RMSNorm weights are replicated: the residual stream between blocks is the same on every rank of the
tensor-parallel group. (Sequence parallelism would shard the norms' activations over the sequence;
at T = 1 per decode step there is nothing to shard, so it is left out.)

All communication is torch's: ``parallelize_module`` installs the input/output redistributions, FSDP2
composes on the data-parallel dimension of Lightning's ``(data_parallel, tensor_parallel)`` mesh.

Shape letters: B batch, T sequence, V vocabulary, tp tensor-parallel size.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    loss_parallel,
    parallelize_module,
)

from llama2_lightning.config import LlamaConfig
from llama2_lightning.model import Transformer

TP_DIM = "tensor_parallel"
DP_DIM = "data_parallel"


def tensor_parallel_mesh(mesh: DeviceMesh | None) -> DeviceMesh | None:
    """The 1-D tensor-parallel sub-mesh of Lightning's mesh, or ``None`` when its size is 1 (or no mesh)."""
    if mesh is None or not mesh.mesh_dim_names or TP_DIM not in mesh.mesh_dim_names:
        return None
    tp = mesh[TP_DIM]
    return tp if tp.size() > 1 else None


def check_tensor_parallel(config: LlamaConfig, tp_size: int) -> None:
    """Raise a config error naming the key when ``config`` cannot be split ``tp_size`` ways."""
    if tp_size <= 1:
        return
    where = "trainer.strategy.init_args.tensor_parallel_size"
    for key in ("n_heads", "n_kv_heads"):
        value = getattr(config, key)
        if value % tp_size != 0:
            raise ValueError(
                f"{where}={tp_size} must divide model {key}={value}: attention is split by heads, each rank "
                f"holding {key}/{tp_size} of them (Llama 2 70B: 64 query and 8 KV heads, so TP 1, 2, 4 or 8)"
            )
    if config.hidden_dim % tp_size != 0:
        raise ValueError(f"{where}={tp_size} must divide the feed-forward width hidden_dim={config.hidden_dim}")
    if config.tie_word_embeddings:
        raise ValueError(
            f"{where}={tp_size} with model tie_word_embeddings=true: the embedding (vocabulary rows of a "
            "row-wise split) and the LM head (a column-wise split) would need one tensor in two layouts; "
            "use tensor_parallel_size 1 for tied models"
        )
    if config.vocab_size % tp_size != 0:
        raise ValueError(
            f"{where}={tp_size} must divide model vocab_size={config.vocab_size}: the embedding table and the "
            "LM head are split on the vocabulary (pad the vocabulary to a multiple of the TP size)"
        )


class Replicated(ParallelStyle):
    """Parameters replicated over the TP group (``Replicate()`` DTensors), plain tensors in and out.

    For the RMSNorms and a scalar head, whose inputs are the same on every TP rank. Left as plain
    tensors they would work too, but FSDP2 would then put them on the 1-D data-parallel mesh and the
    rest on the 2-D mesh, and gradient clipping and the foreach optimisers cannot mix meshes.
    No communication: the gradients they receive are already the same on every rank."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module, device_mesh,
            input_fn=lambda mod, inputs, mesh: tuple(
                DTensor.from_local(x, mesh, [Replicate()]) if isinstance(x, Tensor) and not isinstance(x, DTensor)
                else x for x in inputs
            ),
            output_fn=lambda mod, out, mesh: out.to_local() if isinstance(out, DTensor) else out,
        )


def _block_plan() -> dict[str, Any]:
    return {
        "attention_norm": Replicated(),
        "ffn_norm": Replicated(),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(),
    }


def parallelize_transformer(model: Transformer, mesh: DeviceMesh | None) -> Transformer:
    """Split ``model`` over the tensor-parallel dimension of ``mesh`` in place (a no-op at TP size 1).

    Call before FSDP2's ``fully_shard`` (which then shards the TP shards over the data-parallel
    dimension) and before materialising a meta-device model. A dropped LM head (a reward or value
    trunk) is left alone; the scalar head on top stays replicated (it is ``dim`` numbers)."""
    tp_mesh = tensor_parallel_mesh(mesh)
    return model if tp_mesh is None else apply_tensor_parallel(model, tp_mesh)


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh) -> Transformer:
    """The plan of :func:`parallelize_transformer` on a 1-D tensor-parallel mesh, in place, at any size.

    Training never calls it at size 1 (the plain path is the same computation without DTensor
    dispatch); ``benchmarks/bench_tensor_parallel.py`` does, to measure what the TP code path costs on
    one GPU against the plain path."""
    tp = tp_mesh.size()
    has_lm_head = isinstance(model.output, nn.Linear)
    check_tensor_parallel(model.config, tp)
    plan: dict[str, Any] = {
        # vocabulary rows split over ranks; each rank looks up the ids it holds, the partial rows summed
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
        "norm": Replicated(),
    }
    if has_lm_head:
        # logits (B, T, V/tp) per rank as a DTensor: Transformer.forward gathers them unless asked for
        # the sharded ones (the training losses, under loss_parallel)
        plan["output"] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    parallelize_module(model, tp_mesh, plan)
    for block in model.layers:
        parallelize_module(block, tp_mesh, _block_plan())
        # the forward reshapes by local weight shapes; the KV cache is sized by these
        block.attention.n_heads = model.config.n_heads // tp
        block.attention.n_kv_heads = model.config.n_kv_heads // tp
    model.tensor_parallel_mesh = tp_mesh
    return model


def parallelize_scalar_model(model: nn.Module, mesh: DeviceMesh | None) -> nn.Module:
    """:func:`parallelize_transformer` for a reward or value model (``ScalarModel``): the trunk split,
    the (1, dim) head replicated over the TP group."""
    tp_mesh = tensor_parallel_mesh(mesh)
    if tp_mesh is None:
        return model
    parallelize_transformer(model.trunk, mesh)
    parallelize_module(model.head, tp_mesh, Replicated())
    model.tensor_parallel_mesh = tp_mesh
    return model


def data_parallel_rank(trainer: Any) -> int:
    """The rank of this process's data-parallel replica: the global rank without tensor parallelism,
    the same for every rank of a TP group with it (they must draw the same samples and minibatches)."""
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    return int(kwargs.get("rank", trainer.global_rank))


def data_parallel_size(trainer: Any) -> int:
    """The number of data-parallel replicas: the world size without tensor parallelism."""
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    return int(kwargs.get("num_replicas", trainer.world_size))


def data_parallel_group(trainer: Any) -> Any:
    """The process group over which statistics of the global batch are reduced: the data-parallel
    sub-mesh's group of a ``(data_parallel, tensor_parallel)`` mesh (the ranks of one TP group hold the
    same rows, so reducing over every rank would count them tp times), else ``None``, the default
    group, where every rank is a replica (DDP, FSDP without a mesh, no trainer)."""
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    try:
        mesh = getattr(strategy, "device_mesh", None)
    except RuntimeError:  # Lightning's ModelParallelStrategy before its processes exist
        mesh = None
    if not isinstance(mesh, DeviceMesh):
        return None
    names = mesh.mesh_dim_names or ()
    if mesh.ndim == 1:
        return mesh.get_group()
    if DP_DIM not in names:
        raise ValueError(f"the device mesh has dimensions {names}; expected one named {DP_DIM!r}")
    return mesh[DP_DIM].get_group()


def is_tensor_parallel(model: nn.Module) -> bool:
    return getattr(model, "tensor_parallel_mesh", None) is not None


def replicate_across_tp(x: Tensor, model: nn.Module) -> Tensor:
    """``x`` as held by the first rank of ``model``'s tensor-parallel group, on every rank of it.

    Sampling draws from each rank's own RNG; the ranks of a TP group must feed the same next token
    to the next step. The first rank's draw is summed with zeros from the others (a ``Partial``
    DTensor made ``Replicate``: one all-reduce over the TP group only, so data-parallel replicas that
    stop early never wait for each other)."""
    mesh = getattr(model, "tensor_parallel_mesh", None)
    if mesh is None:
        return x
    local = x if mesh.get_local_rank() == 0 else torch.zeros_like(x)
    return DTensor.from_local(local, mesh, [Partial()]).redistribute(mesh, [Replicate()]).to_local()


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Token cross-entropy of ``logits`` (N, V) against ``targets`` (N,), in float32.

    Logits sharded on the vocabulary (a DTensor from ``Transformer.forward(sharded_logits=True)``)
    are reduced under ``loss_parallel``: each rank's log-sum-exp over its V/tp columns is combined
    across the group, so the (N, V) logits are never gathered on one rank. Its backward must run
    under :func:`loss_backward_context`."""
    if isinstance(logits, DTensor):
        with loss_parallel():
            loss = F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction=reduction)
        return loss.full_tensor()  # a Replicate DTensor: every rank already holds the whole value
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction=reduction)


def vocab_argmax(logits: Tensor) -> Tensor:
    """``logits.argmax(-1)`` (...,) for logits (..., V), plain or sharded on the vocabulary.

    Sharded, each rank takes the maximum of its V/tp columns and only those (..., tp) maxima and
    their ids are gathered, not the logits; ties go to the lowest id, as with ``argmax``."""
    if not isinstance(logits, DTensor):
        return logits.argmax(dim=-1)
    mesh, local = logits.device_mesh, logits.to_local()  # local (..., V/tp)
    values, ids = local.max(dim=-1, keepdim=True)  # (..., 1) each
    ids = ids + mesh.get_local_rank() * local.size(-1)  # global ids: the vocabulary splits evenly
    values = DTensor.from_local(values, mesh, [Shard(-1)]).full_tensor()  # (..., tp)
    ids = DTensor.from_local(ids, mesh, [Shard(-1)]).full_tensor()  # (..., tp)
    return ids.gather(-1, values.argmax(dim=-1, keepdim=True)).squeeze(-1)  # (...,)


def loss_backward_context(model: nn.Module) -> contextlib.AbstractContextManager:
    """``loss_parallel`` for the backward pass of :func:`cross_entropy` on a TP model (torch needs
    the backward in the context too); a no-op otherwise. LightningModules wrap ``backward`` in it."""
    return loss_parallel() if is_tensor_parallel(model) else contextlib.nullcontext()
