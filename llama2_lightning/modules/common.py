"""Pieces every stage's LightningModule shares: config, initial weights, batches, optimiser setup."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from llama2_lightning.checkpoint import detect_format, load_checkpoint, read_config
from llama2_lightning.checkpoint.hf_weights import hf_weights
from llama2_lightning.checkpoint.meta_shards import MetaShards, meta_weights
from llama2_lightning.checkpoint.state_dict import check_state_dict, expected_shapes
from llama2_lightning.config import LlamaConfig
from llama2_lightning.distributed import is_sharded, shard_for_training
from llama2_lightning.model import Transformer
from llama2_lightning.modules.args import OptimizerArgs, ShardingArgs, as_args
from llama2_lightning.optim import build_optimizer, cosine_with_warmup, param_groups
from llama2_lightning.reward_models import is_reward_checkpoint, read_reward_checkpoint
from llama2_lightning.scalar_model import ScalarModel
from llama2_lightning.shard_loading import device_mesh_of, load_distributed, materialization_device, materialize


def unpack_lm_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """(inputs, targets) from a ``{"input_ids", "labels"|"targets"}`` dict or an ``(x, y)`` pair, each (B, T)."""
    if isinstance(batch, dict):
        return batch["input_ids"], batch["labels"] if "labels" in batch else batch["targets"]
    x, y = batch
    return x, y


def save_grouped_hyperparameters(module: L.LightningModule, optimizer: OptimizerArgs | dict[str, Any] | None,
                                 default_optimizer: OptimizerArgs, sharding: ShardingArgs | dict[str, Any] | None,
                                 ignore: Sequence[str] = ()) -> tuple[OptimizerArgs, ShardingArgs]:
    """``module.save_hyperparameters`` with the argument groups stored as plain dicts (checkpoints load
    with ``weights_only=True``); returns the groups as dataclasses (from a checkpoint's dicts too)."""
    opt, shard = as_args(OptimizerArgs, optimizer, default_optimizer), as_args(ShardingArgs, sharding, ShardingArgs())
    module.save_hyperparameters(ignore=list(ignore), frame=inspect.currentframe().f_back)
    module.hparams.update(optimizer=asdict(opt), sharding=asdict(shard))
    return opt, shard


def build_config(model: str | dict[str, Any] | None, model_overrides: dict[str, Any] | None = None,
                 init_from: str | None = None) -> LlamaConfig:
    """A preset name (``"tiny"``, ``"llama2-7b"``...), a full ``LlamaConfig`` dict, or (``model=None``)
    the config stored with the ``init_from`` checkpoint; then ``model_overrides``."""
    overrides = dict(model_overrides or {})
    if model is None:
        if not init_from:
            raise ValueError("model: give a preset name or config dict, or set init_from to take the checkpoint's")
        return LlamaConfig.from_dict({**read_config(init_from).to_dict(), **overrides})
    if isinstance(model, str):
        return LlamaConfig.from_name(model, **overrides)
    return LlamaConfig.from_dict({**model, **overrides})


def load_initial_weights(model: nn.Module, init_from: str, device: torch.device | str | None = None,
                         prefix: str = "") -> None:
    """Fill ``model`` (meta-device or not, sharded or not) from a Meta / Hugging Face / Lightning
    checkpoint of a language model: each rank copies only its own slice, cast to the model's dtype, so
    master weights stay float32 when the checkpoint holds bf16. ``prefix`` places the checkpoint's
    Transformer inside ``model`` (``"trunk."`` for a reward or value model, whose dropped LM head skips
    ``output.weight`` and whose new head is initialised). A sharded Lightning checkpoint directory is
    read shard by shard with ``torch.distributed.checkpoint`` when the model is sharded too."""
    config = read_config(init_from)
    target = model.get_submodule(prefix.rstrip(".")) if prefix else model
    if config.architecture() != target.config.architecture():
        raise ValueError(f"init_from={init_from}: its config {config} differs from the module's {target.config}")
    device = device if device is not None else materialization_device(device_mesh_of(model))
    own_names = {name for name, _ in model.state_dict().items()}
    if Path(init_from).is_dir() and detect_format(init_from) == "lightning" and is_sharded(model) and not prefix:
        materialize(model, device)  # storage (random values), overwritten by this rank's shards below
        load_distributed(model, init_from)
        return
    if detect_format(init_from) == "meta" and is_sharded(model):
        # each rank reads its blocks from the shards holding them, nothing merged (meta_shards.py):
        # TP rank i of a plan that splits as Meta did opens consolidated.0i.pth only
        shards = MetaShards(init_from)
        tp_mesh = getattr(target, "tensor_parallel_mesh", None)
        own = tp_mesh.get_local_rank() if tp_mesh is not None and tp_mesh.size() == len(shards) else 0
        weights = meta_weights(shards, own)
        if config.tie_word_embeddings:
            weights.pop("output.weight", None)  # save_meta's copy of the embedding, as load_meta drops it
        # strict, as load_meta: a missing tensor must not be left to materialize's reset_parameters
        check_state_dict(expected_shapes(config), weights, init_from)  # type: ignore[arg-type]
        state_dict = {prefix + k: v for k, v in weights.items() if prefix + k in own_names or not prefix}
        materialize(model, device, state_dict, source=str(init_from))  # type: ignore[arg-type]
        return
    lazy = hf_weights(init_from) if detect_format(init_from) == "hf" and is_sharded(model) else None
    if lazy is not None:  # safetensors: each rank reads its blocks only (hf_weights.py)
        state_dict = {prefix + k: v for k, v in lazy.items() if prefix + k in own_names or not prefix}
        materialize(model, device, state_dict, source=str(init_from))  # type: ignore[arg-type]
        return
    _, state_dict = load_checkpoint(init_from)  # memory-mapped where the format allows
    state_dict = {prefix + k: v for k, v in state_dict.items() if prefix + k in own_names or not prefix}
    materialize(model, device, state_dict, source=str(init_from))


def build_transformer(config: LlamaConfig, init_from: str | None = None, activation_checkpointing: bool = False,
                      device_mesh: Any = None, param_dtype: str | None = None,
                      reduce_dtype: str | None = "float32", dtype: torch.dtype | None = None) -> Transformer:
    """The language model of a stage, for ``configure_model``: built on the meta device (no memory),
    sharded per block by FSDP2 when there is a mesh, then materialised: each rank allocates its shard and
    copies its slice of ``init_from`` (or initialises it randomly without one). ``dtype``: the weights'
    own dtype (a frozen reference model in bf16); default the current default dtype (float32 master
    weights, or what Lightning's precision plugin set)."""
    with torch.device("meta"):
        model = Transformer(config)
    if dtype is not None:
        model.to(dtype)  # on meta: no memory; the RoPE table stays float32
    model.activation_checkpointing = activation_checkpointing
    if device_mesh is not None:
        shard_for_training(model, device_mesh, param_dtype, reduce_dtype)  # TP (if any), then FSDP2
    device = materialization_device(device_mesh)
    if init_from:
        load_initial_weights(model, init_from, device)
    else:
        materialize(model, device)
    return model


def build_scalar_model(config: LlamaConfig, init_from: str | None = None, activation_checkpointing: bool = False,
                       device_mesh: Any = None, param_dtype: str | None = None,
                       reduce_dtype: str | None = "float32", dtype: torch.dtype | None = None) -> ScalarModel:
    """A reward or value model (trunk + scalar head, LM head dropped: the paper's swap), built, sharded
    and loaded like :func:`build_transformer`. ``init_from``: a reward checkpoint (trunk and head) or a
    language-model checkpoint (its trunk, a new head)."""
    with torch.device("meta"):
        model = ScalarModel.from_transformer(Transformer(config), drop_lm_head=True)
    if dtype is not None:
        model.to(dtype)
    model.trunk.activation_checkpointing = activation_checkpointing
    if device_mesh is not None:
        shard_for_training(model, device_mesh, param_dtype, reduce_dtype)  # TP (if any), then FSDP2
    device = materialization_device(device_mesh)
    if init_from and is_reward_checkpoint(init_from):
        found, state_dict, _ = read_reward_checkpoint(init_from)
        if found.architecture() != config.architecture():
            raise ValueError(f"init_from={init_from}: its config {found} differs from the module's {config}")
        materialize(model, device, state_dict, source=str(init_from))
    elif init_from:
        load_initial_weights(model, init_from, device, prefix="trunk.")
    else:
        materialize(model, device)
    return model


def cosine_adamw(module: L.LightningModule, models: Sequence[tuple[nn.Module | None, float]], args: OptimizerArgs,
                 total_steps: int | None = None) -> dict[str, Any]:
    """AdamW (or 8-bit AdamW) over each ``(model, peak lr)`` + linear warm-up + cosine to ``min_lr_ratio``,
    stepped per optimiser step. The cosine spans ``args.decay_steps``, else ``total_steps``, else
    ``trainer.max_steps``, else the estimated stepping batches."""
    groups = [{**g, "lr": lr} for model, lr in models if model is not None
              for g in param_groups(model, args.weight_decay, args.decay_norm_and_embeddings) if g["params"]]
    opt = build_optimizer(groups, args.name, args.lr, tuple(args.betas), args.eps)
    total = args.decay_steps or total_steps
    if total is None:
        trainer = module.trainer
        total = trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)
    warmup, floor = args.warmup_for(total), args.min_lr_ratio
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: cosine_with_warmup(step, warmup, total, floor))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
