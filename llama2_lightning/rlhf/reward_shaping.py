"""Llama 2's RLHF reward (section 3.2.3): safety gating of the two reward models, logit, whitening,
and the per-token reward with the KL penalty.

    R_c = R_s if is_safety(p) or R_s < 0.15 else R_h
    R   = WHITEN(LOGIT(R_c)) - beta * KL(pi_theta(g | p) || pi_0(g | p))

R_s and R_h are the safety and helpfulness reward models' scores passed through a sigmoid, so they
lie in [0, 1]; the 0.15 threshold lives on that scale (the paper picks it for a precision of 0.89
and recall of 0.55 on unsafe responses, Meta Safety test set). LOGIT undoes the sigmoid to recover
linear scores, and whitening them keeps the reward scale stable across rollouts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llama2_lightning.rlhf.kl import KLKind, kl_penalty
from llama2_lightning.rlhf.masking import check_contiguous, last_true_index, masked_whiten

SAFETY_THRESHOLD = 0.15


def _check_probability(name: str, p: Tensor) -> None:
    if p.numel() and (p.min() < 0 or p.max() > 1):
        raise ValueError(
            f"{name} must be sigmoid scores in [0, 1] (got range [{p.min().item():.4g}, {p.max().item():.4g}]); "
            "pass torch.sigmoid(raw_reward)"
        )


def combine_rewards(
    r_helpful: Tensor, r_safety: Tensor, is_safety: Tensor, threshold: float = SAFETY_THRESHOLD
) -> Tensor:
    """The safety-gated reward R_c (section 3.2.3): R_s where the prompt is tagged safety or R_s < threshold, else R_h.

    r_helpful, r_safety: (B,) sigmoid scores in [0, 1] (checked, since the threshold means nothing
    on raw logits); is_safety: (B,) bool, whether the prompt comes from the safety set. Returns (B,).
    The comparison is strict, as in the paper: R_s == threshold keeps the helpfulness score.
    """
    if not (r_helpful.shape == r_safety.shape == is_safety.shape):
        raise ValueError(
            f"combine_rewards: r_helpful {tuple(r_helpful.shape)}, r_safety {tuple(r_safety.shape)} and "
            f"is_safety {tuple(is_safety.shape)} must share one (B,) shape"
        )
    _check_probability("r_helpful", r_helpful)
    _check_probability("r_safety", r_safety)
    use_safety = is_safety.bool() | (r_safety < threshold)
    return torch.where(use_safety, r_safety, r_helpful)


def logit(p: Tensor, eps: float = 1e-6) -> Tensor:
    """LOGIT of section 3.2.3, ``log(p / (1 - p))``, the inverse sigmoid; any shape.

    Both ``p`` and ``1 - p`` are clamped below at ``eps`` so a saturated reward model (p exactly 0
    or 1) gives a large finite score, ``-+log(1 / eps)``, rather than ``inf``, which whitening
    would turn into nan. Clamping ``1 - p`` instead of ``p`` at ``1 - eps`` keeps the two ends
    symmetric in float32, where ``1 - eps`` itself is not representable.
    """
    q = 1.0 - p  # exact for p >= 0.5 (Sterbenz), so the upper tail keeps its precision
    return torch.log(p.clamp(min=eps)) - torch.log(q.clamp(min=eps))


def whiten_rewards(r: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """WHITEN of section 3.2.3: standardise a (B,) batch of sequence rewards to zero mean, unit variance.

    Statistics are over the whole batch (the rollout); see ``masked_whiten`` for the single-sample
    case and ``shift_mean``.
    """
    return masked_whiten(r, torch.ones_like(r, dtype=torch.bool), shift_mean=shift_mean, eps=eps)


def llama2_reward(
    r_helpful: Tensor,
    r_safety: Tensor,
    is_safety: Tensor,
    threshold: float = SAFETY_THRESHOLD,
    logit_eps: float = 1e-6,
    whiten_eps: float = 1e-8,
) -> Tensor:
    """The sequence reward ``R~_c = WHITEN(LOGIT(R_c))`` of section 3.2.3, (B,) from (B,) inputs.

    Inputs as in ``combine_rewards``; the KL term is added per token by ``per_token_rewards``.
    """
    return whiten_rewards(logit(combine_rewards(r_helpful, r_safety, is_safety, threshold), logit_eps), eps=whiten_eps)


def per_token_rewards(
    seq_reward: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    beta: float,
    kl_kind: KLKind = "k1",
) -> Tensor:
    """Per-token PPO reward: ``-beta * KL_t`` on each response token, plus ``seq_reward`` on the last one.

    Summed over a response this is the paper's final reward ``R = R~_c - beta * KL`` (section
    3.2.3) with the sequence KL written as the sum of per-token k1 terms, so GAE credits the KL
    cost to the token that incurred it and the reward models' score to the finished response.

    seq_reward: (B,) e.g. from ``llama2_reward``; logprobs, ref_logprobs: (B, T) log-probs of the
    sampled tokens under pi_theta (at rollout) and pi_0; mask: (B, T) response tokens, one
    contiguous non-empty run per row (rows may end at different positions). Returns (B, T),
    detached, 0 outside the mask.
    """
    if seq_reward.shape != mask.shape[:1]:
        raise ValueError(
            f"per_token_rewards: seq_reward {tuple(seq_reward.shape)} must be (B,) "
            f"for a mask of shape {tuple(mask.shape)}"
        )
    check_contiguous(mask)
    mask = mask if mask.dtype == torch.bool else mask != 0
    kl = kl_penalty(logprobs.detach(), ref_logprobs.detach(), kl_kind)  # (B, T)
    rewards = torch.where(mask, -beta * kl, torch.zeros_like(kl))
    last = last_true_index(mask)  # (B,)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += seq_reward.detach().to(rewards.dtype)
    return rewards
