"""Optimiser and learning-rate schedule shared by every stage (paper section 2.2 and 3)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

OptimizerName = Literal["adamw", "adamw8bit"]


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> float:
    """LR multiplier: linear warm-up from 0 to 1 over ``warmup_steps``, then cosine decay to
    ``min_lr_ratio`` at ``total_steps`` and flat after (Llama 2: 2,000 warm-up steps, final LR 10% of peak)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_embeddings: bool = False) -> list[dict]:
    """Weight decay on the matmul weights only: norms' gains and the embedding table are left alone
    unless asked (decaying a gain pulls it to 0, i.e. towards switching the layer off)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if decay_norm_and_embeddings or (p.ndim >= 2 and "tok_embeddings" not in name):
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(groups: Iterable[dict], name: OptimizerName, lr: float, betas: tuple[float, float],
                    eps: float) -> torch.optim.Optimizer:
    groups = list(groups)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas, eps=eps)
    raise ValueError(f"unknown optimizer {name!r}; expected 'adamw' or 'adamw8bit'")
