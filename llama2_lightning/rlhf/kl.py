"""Per-token estimates of KL(pi_theta || pi_0) from the log-probs of sampled tokens.

Llama 2 penalises the policy for drifting from the initial (SFT) policy pi_0 (section 3.2.3,
``R = R~_c - beta * KL(pi_theta(g|p) || pi_0(g|p))``). Only the sampled token's log-prob is known
per position, so the KL is estimated from a single sample x ~ pi_theta; the estimators are those
of Schulman, "Approximating KL Divergence" (2020), with ``log r = log pi_0(x) - log pi_theta(x)``.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

KLKind = Literal["k1", "abs", "mse", "k3"]


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: KLKind = "k1") -> Tensor:
    """Single-sample KL(pi_theta || pi_0) estimate for each sampled token (section 3.2.3).

    logprobs: (B, T) log pi_theta of the sampled tokens; ref_logprobs: (B, T) log pi_0 of the same
    tokens. Returns (B, T); positions outside the response are the caller's to mask.

    - ``"k1"``: ``logp - logp_ref``. Unbiased and the one summed into the PPO reward, since its
      expectation along the trajectory is exactly the sequence KL; it can be negative per token.
    - ``"abs"``: ``|logp - logp_ref|``, a biased but sign-free variant.
    - ``"mse"``: ``0.5 * (logp - logp_ref) ** 2`` (Schulman's k2), biased, low variance.
    - ``"k3"``: ``(r - 1) - log r`` with ``r = exp(logp_ref - logp)``; unbiased, always >= 0 and of
      low variance, so it is the one to log. Computed with ``expm1`` to stay exact near r = 1.
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"kl_penalty: logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ in shape"
        )
    diff = logprobs - ref_logprobs  # log pi_theta - log pi_0 = -log r
    if kind == "k1":
        return diff
    if kind == "abs":
        return diff.abs()
    if kind == "mse":
        return 0.5 * diff.square()
    if kind == "k3":
        log_r = -diff
        return torch.expm1(log_r) - log_r
    raise ValueError(f"kl_penalty: unknown kind {kind!r}; allowed: {', '.join(get_args(KLKind))}")


def sequence_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kind: KLKind = "k1") -> Tensor:
    """(B,) KL(pi_theta || pi_0) estimate of each answer: the per-token ``kind`` estimates (B, T) summed
    over the answer positions ``mask`` (B, T) (with ``k1`` the unbiased sequence KL, section 3.2.3)."""
    return torch.where(mask, kl_penalty(logprobs, ref_logprobs, kind), 0.0).sum(dim=1)
