"""Argument groups every stage's LightningModule takes: how it optimises, how it lays the model out, and
which of its weights it trains.

LightningCLI (jsonargparse) nests a dataclass argument in YAML, so a config reads
``optimizer: {lr: 2.0e-5, warmup_steps: 10}``, ``sharding: {param_dtype: bfloat16}`` and
``finetune: {lora_rank: 8}``, and a key
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


# The Meta names of the linear maps LoRA can adapt: Attention's and FeedForward's (model.py).
LORA_TARGETS: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass(frozen=True)
class FinetuneArgs:
    """Which weights a stage trains: all of them (the paper), LoRA adapters (Hu et al. 2021, through
    ``peft``), or only the top blocks; ways to fit a small CPU. A reward or value model's scalar head
    always trains. ``modules/finetune.py`` applies it and keeps checkpoints in Meta's layout."""

    lora_rank: int | None = None
    """LoRA rank r: every target ``W`` becomes ``W + (lora_alpha / r) B A`` with only ``A`` (r, in) and
    ``B`` (out, r) trained, ``B`` starting at 0 so the model starts unchanged; ``None``: full fine-tuning."""
    lora_alpha: float = 16
    """LoRA's scale numerator: the update is scaled by ``lora_alpha / lora_rank``."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input (keep 0 for PPO: its ratio compares train-mode log-probs to eval-mode ones)."""
    lora_targets: tuple[str, ...] = LORA_TARGETS
    """Which linear maps of every (adapted) block get adapters, by Meta name: wq wk wv wo w1 w2 w3."""
    trainable_blocks: int | None = None
    """Train only the top N transformer blocks plus the final norm and an untied LM head (a tied one is the
    embedding table and stays frozen); the embeddings and lower blocks are frozen, so backward stops at block
    n_layers - N. With ``lora_rank``: adapters in the top N blocks only, nothing else trains. ``None``: all."""

    def __post_init__(self) -> None:
        if self.lora_rank is not None and self.lora_rank <= 0:
            raise ValueError(f"finetune.lora_rank must be a positive integer or null, got {self.lora_rank}")
        if self.lora_alpha <= 0:
            raise ValueError(f"finetune.lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"finetune.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if isinstance(self.lora_targets, str) or not self.lora_targets:
            raise ValueError(f"finetune.lora_targets must be a non-empty list of {list(LORA_TARGETS)}, "
                             f"got {self.lora_targets!r}")
        if unknown := [t for t in self.lora_targets if t not in LORA_TARGETS]:
            raise ValueError(f"finetune.lora_targets: unknown {unknown}; allowed: {list(LORA_TARGETS)}")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))  # a YAML or checkpoint list
        if self.trainable_blocks is not None and self.trainable_blocks < (1 if self.lora_rank else 0):
            raise ValueError(f"finetune.trainable_blocks must be >= {1 if self.lora_rank else 0} "
                             f"({'adapters need a block' if self.lora_rank else '0: only the final norm and head'}) "
                             f"or null, got {self.trainable_blocks}")

    @property
    def is_full(self) -> bool:
        """Every weight trains: the paper's fine-tuning, nothing to apply."""
        return self.lora_rank is None and self.trainable_blocks is None


Args = TypeVar("Args", OptimizerArgs, ShardingArgs, FinetuneArgs)


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


__all__ = ["FinetuneArgs", "LORA_TARGETS", "OptimizerArgs", "ShardingArgs", "OptimizerName", "as_args"]
