"""PPO objectives for the policy and value models (Schulman et al. 2017, "Proximal Policy
Optimization Algorithms", eq. 7), as used by Llama 2's RLHF stage (section 3.2.3: clip 0.2, one
gradient step per minibatch).

All losses are per-token means over the response mask, and every stat is a detached scalar tensor
for logging.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llama2_lightning.rlhf.kl import kl_penalty
from llama2_lightning.rlhf.masking import masked_mean


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate loss ``mean_mask(-min(r * A, clip(r, 1 - eps, 1 + eps) * A))`` (section 3.2.3).

    logprobs: (B, T) log pi_theta of the sampled tokens (differentiable); old_logprobs: (B, T) under
    the policy that generated the rollout; advantages: (B, T); mask: (B, T) response tokens. The
    ratio is formed in log space so tiny probabilities do not underflow.

    Returns ``(loss, stats)``: ``loss`` is a scalar; ``stats`` holds ``clip_fraction`` (share of
    tokens where the clipped term is the one taken, i.e. whose gradient is cut), ``approx_kl``
    (k3 estimate of KL(pi_old || pi_theta), the usual early-warning signal for too large a step) and
    ``ratio_mean``.
    """
    old_logprobs, advantages = old_logprobs.detach(), advantages.detach()
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    # max of the negated terms == -min of the surrogates: the pessimistic bound of eq. 7.
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((clipped > unclipped).to(logprobs.dtype), mask),
            # kl_penalty(p, q, "k3") estimates KL(p || q) from samples of p; the rollout came from pi_old.
            "approx_kl": masked_mean(kl_penalty(old_logprobs, logprobs.detach(), "k3"), mask),
            "ratio_mean": masked_mean(ratio.detach(), mask),
        }
    return loss, stats


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss ``0.5 * mean_mask(max((V - R)^2, (V_clip - R)^2))`` (section 3.2.3 PPO).

    values: (B, T) current value predictions (differentiable); old_values: (B, T) predictions at
    rollout time; returns: (B, T) GAE value targets; mask: (B, T). ``V_clip = old + clip(V - old,
    -eps, eps)``, so ``clip_eps`` is in reward units. The paper does not state its value-clipping
    setting; this is the PPO2 baseline convention, which keeps the critic from outrunning the
    rollout's targets in one step, like the policy's ratio clip.

    Returns ``(loss, stats)`` with ``clip_fraction`` (share of tokens where the clipped error is the
    larger one) and ``value_mean``.
    """
    old_values, returns = old_values.detach(), returns.detach()
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    err_unclipped = (values - returns).square()
    err_clipped = (values_clipped - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(err_unclipped, err_clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((err_clipped > err_unclipped).to(values.dtype), mask),
            "value_mean": masked_mean(values.detach(), mask),
        }
    return loss, stats


def entropy_from_logits(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean entropy of the next-token distributions, a scalar, for monitoring policy collapse (section 3.2.3).

    logits: (B, T, V); mask: (B, T) or None for all positions. Computed in float32 from
    ``log_softmax`` so bf16 logits do not lose the tail; tokens with probability 0 (``-inf``
    logits) contribute 0 rather than ``0 * -inf = nan``.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros((), dtype=p.dtype, device=p.device))
    entropy = -plogp.sum(dim=-1)  # (B, T)
    if mask is None:
        return entropy.mean()
    return masked_mean(entropy, mask)
