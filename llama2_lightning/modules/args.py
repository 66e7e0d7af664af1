"""Argument groups every stage's LightningModule takes: how it optimises and how it lays the model out.

LightningCLI (jsonargparse) nests a dataclass argument in YAML, so a config reads
``optimizer: {lr: 2.0e-5, warmup_steps: 10}`` and ``sharding: {param_dtype: bfloat16}``, and a key
left out keeps the module's own default (each module passes its defaults as an instance). Both are
frozen: one default instance is shared by every module built without the argument. In a
checkpoint's hyperparameters they are plain dicts (``asdict``), so checkpoints load with
``weights_only=True``, and a module accepts that dict back.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, TypeVar

from llama2_lightning.optim import OptimizerName

DTypeName = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class OptimizerArgs:
    """AdamW and its learning-rate schedule: linear warm-up, then cosine decay to a floor (paper 2.2)."""

    name: OptimizerName = "adamw"
    """``adamw``, or ``adamw8bit`` (bitsandbytes: about 4x less optimiser-state memory)."""
    lr: float = 3e-4
    """Peak learning rate (paper: 3e-4 pretraining 7B/13B, 2e-5 SFT, 1e-5 reward models, 1e-6 PPO)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW beta1, beta2 (paper: 0.9, 0.95)."""
    eps: float = 1e-5
    """AdamW epsilon (paper: 1e-5)."""
    weight_decay: float = 0.1
    """Decoupled weight decay on the matmul weights (paper: 0.1)."""
    decay_norm_and_embeddings: bool = False
    """Also decay the norms' gains and the embedding table (decaying a gain pulls a layer towards off)."""
    warmup_steps: int = 0
    """Linear warm-up, in optimiser steps (paper, pretraining: 2,000); with ``warmup_ratio``, the minimum."""
    warmup_ratio: float = 0.0
    """Warm-up as a share of all optimiser steps (paper, reward models: 3%, at least 5 steps)."""
    min_lr_ratio: float = 0.1
    """The cosine's floor as a fraction of the peak (paper: 10%); 1.0 keeps the rate constant."""
    decay_steps: int | None = None
    """Length of the cosine in optimiser steps; ``None``: the whole run (``RLHFModule``: no decay)."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.eps <= 0 or self.weight_decay < 0:
            raise ValueError(f"optimizer: lr and eps must be > 0 and weight_decay >= 0, got lr={self.lr}, "
                             f"eps={self.eps}, weight_decay={self.weight_decay}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"optimizer.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optimizer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")

    def warmup_for(self, total_steps: int) -> int:
        """Warm-up steps of a run of ``total_steps`` optimiser steps: the larger of both settings."""
        return max(self.warmup_steps, math.ceil(self.warmup_ratio * total_steps))


@dataclass(frozen=True)
class ShardingArgs:
    """How a model is laid out in memory: FSDP2 mixed precision when sharded, recomputation."""

    param_dtype: DTypeName | None = None
    """Compute dtype of the sharded weights (``bfloat16`` on GPUs); the master weights keep theirs."""
    reduce_dtype: DTypeName | None = "float32"
    """Dtype gradients are reduced in across data-parallel ranks (fp32: no precision lost summing)."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in backward instead of keeping its activations."""


Args = TypeVar("Args", OptimizerArgs, ShardingArgs)


def as_args(cls: type[Args], value: Args | dict[str, Any] | None, default: Args) -> Args:
    """``value`` as ``cls``: an instance as is, a dict (a checkpoint's hyperparameters) field by field
    over ``default``, ``None`` the default. Unknown keys are refused by name."""
    if value is None:
        return default
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"expected {cls.__name__} or a dict of its fields, got {type(value).__name__}")
    names = {f.name for f in fields(cls)}
    if unknown := sorted(set(value) - names):
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; allowed: {sorted(names)}")
    merged = {**asdict(default), **value}
    if "betas" in merged:
        merged["betas"] = tuple(merged["betas"])
    return cls(**merged)


__all__ = ["OptimizerArgs", "ShardingArgs", "OptimizerName", "as_args"]
