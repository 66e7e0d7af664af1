"""Pieces every stage's LightningModule shares: config, initial weights, batches, optimiser setup."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from llama2_lightning.checkpoint import load_checkpoint, read_config
from llama2_lightning.config import LlamaConfig
from llama2_lightning.distributed import shard_transformer
from llama2_lightning.model import Transformer
from llama2_lightning.optim import OptimizerName, build_optimizer, cosine_with_warmup, param_groups


def unpack_lm_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """(inputs, targets) from a ``{"input_ids", "labels"|"targets"}`` dict or an ``(x, y)`` pair, each (B, T)."""
    if isinstance(batch, dict):
        return batch["input_ids"], batch["labels"] if "labels" in batch else batch["targets"]
    x, y = batch
    return x, y


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


def load_initial_weights(model: Transformer, init_from: str) -> None:
    """Load a Meta / Hugging Face / Lightning checkpoint into ``model`` (possibly on the meta device)."""
    config, state_dict = load_checkpoint(init_from)
    if config.architecture() != model.config.architecture():
        raise ValueError(f"init_from={init_from}: its config {config} differs from the module's {model.config}")
    model.load_state_dict(state_dict, strict=True, assign=True)
    if model.rope_table.is_meta:
        # The RoPE table is not in the state dict; a meta tensor left behind would make the strategy
        # re-materialise (and so re-initialise) the whole model.
        model.rope_table = torch.empty_like(model.rope_table, device=state_dict["output.weight"].device)
        model.reset_parameters()


def build_transformer(config: LlamaConfig, init_from: str | None = None, activation_checkpointing: bool = False,
                      device_mesh: Any = None, param_dtype: str | None = None,
                      reduce_dtype: str | None = "float32") -> Transformer:
    """The language model of a stage, for ``configure_model``: under ModelParallelStrategy this runs on the
    meta device; loading assigns the checkpoint's tensors, FSDP2 shards per block, and the strategy
    materialises whatever is still empty with ``reset_parameters``."""
    model = Transformer(config)
    model.activation_checkpointing = activation_checkpointing
    if init_from:
        load_initial_weights(model, init_from)
    if device_mesh is not None:
        shard_transformer(model, device_mesh, param_dtype, reduce_dtype)
    return model


def cosine_adamw(module: L.LightningModule, params: nn.Module, *, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, warmup_steps: int, min_lr_ratio: float, decay_steps: int | None = None,
                 optimizer: OptimizerName = "adamw", decay_norm_and_embeddings: bool = False) -> dict[str, Any]:
    """AdamW (or 8-bit AdamW) + linear warm-up + cosine to ``min_lr_ratio``, stepped per optimiser step.
    The cosine spans ``decay_steps``, else ``trainer.max_steps``, else the estimated stepping batches."""
    opt = build_optimizer(param_groups(params, weight_decay, decay_norm_and_embeddings), optimizer, lr,
                          tuple(betas), eps)
    trainer = module.trainer
    total = decay_steps or (trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: cosine_with_warmup(step, warmup_steps, total, min_lr_ratio)
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
