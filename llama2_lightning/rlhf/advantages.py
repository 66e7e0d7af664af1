"""Generalised advantage estimation over response tokens (Schulman et al. 2016, "High-Dimensional
Continuous Control Using Generalized Advantage Estimation"), the advantage estimator of
Llama 2's PPO stage (section 3.2.3).

Each response is one episode: its tokens are the actions, the prompt is the (given) initial state,
and the episode ends after the last response token, so the value beyond it bootstraps to 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llama2_lightning.rlhf.masking import check_contiguous


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """GAE advantages and value targets for each response token (section 3.2.3 PPO).

    rewards, values, mask: (B, T). ``mask`` is True on response tokens, which must form one
    contiguous run per row (prompt before, padding after). With
    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``V`` = 0 after the last response token,
    ``A_t = sum_k (gamma * lam)^k delta_{t+k}`` within the response; ``returns = A + V`` are the
    value targets (TD(lambda) returns). Rewards and values outside the mask are ignored, and both
    outputs are 0 there. Returns ``(advantages, returns)``, each (B, T), detached: they are
    regression and policy-gradient targets, never differentiated through.

    Whitening the advantages (``masked_whiten``) is left to the caller so the unwhitened values
    stay available for logging.
    """
    if not (rewards.shape == values.shape == mask.shape) or rewards.dim() != 2:
        raise ValueError(
            f"gae: rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask {tuple(mask.shape)} "
            "must all be the same (B, T) shape"
        )
    check_contiguous(mask)
    mask = mask if mask.dtype == torch.bool else mask != 0
    rewards, values = rewards.detach(), values.detach()
    zero = torch.zeros_like(values[:, 0])  # (B,)
    next_value, next_adv = zero, zero  # beyond the end of every row: terminal, nothing to bootstrap
    advantages = torch.zeros_like(values)  # (B, T)
    for t in reversed(range(values.shape[1])):
        m = mask[:, t]  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = torch.where(m, delta + gamma * lam * next_adv, zero)
        advantages[:, t] = adv
        # Outside the response the carried value and advantage reset to 0, so the last response
        # token of each row sees a terminal successor no matter how much padding follows it.
        next_value = torch.where(m, values[:, t], zero)
        next_adv = adv
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    return advantages, returns
