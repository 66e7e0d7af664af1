"""Win rate of a policy over a baseline, judged by a reward model, with the answer-length effect taken out.

Small reward models reward length (or its absence), so a raw win rate can rise only because answers got
shorter or longer. Two length-controlled views, both on the same per-prompt pairs:

* :func:`length_controlled_win_rate`, the idea of AlpacaEval 2's length-controlled win rate (Dubois et al.
  2024): fit ``P(win) = sigmoid(a + b * d)`` where ``d`` is the standardised length difference, and report
  ``sigmoid(a)``, the win rate the fit predicts for two answers of equal length;
* :func:`win_rate_by_length_bucket`: the plain win rate among pairs whose policy answer is shorter,
  about as long, or longer than the baseline's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# The policy answer is "about as long" when its length is within this factor of the baseline's.
SIMILAR_LENGTH_RATIO = 1.25


def _wins(policy_scores: Sequence[float], baseline_scores: Sequence[float]) -> list[float]:
    if len(policy_scores) != len(baseline_scores) or not policy_scores:
        raise ValueError(f"need equally many policy and baseline scores, got {len(policy_scores)} and "
                         f"{len(baseline_scores)}")
    return [1.0 if p > b else 0.5 if p == b else 0.0 for p, b in zip(policy_scores, baseline_scores)]


def win_rate(policy_scores: Sequence[float], baseline_scores: Sequence[float]) -> float:
    """The share of prompts whose policy answer scores higher (a tie counts half)."""
    wins = _wins(policy_scores, baseline_scores)
    return sum(wins) / len(wins)


def length_controlled_win_rate(policy_scores: Sequence[float], baseline_scores: Sequence[float],
                               policy_lengths: Sequence[int], baseline_lengths: Sequence[int],
                               l2: float = 1e-3, steps: int = 50) -> float:
    """``sigmoid(a)`` of the logistic fit ``P(win) = sigmoid(a + b * d)`` (module docstring), with ``d`` the
    length difference divided by its standard deviation (so ``b`` is unit-free) and a small ``l2`` penalty
    on ``b`` that keeps the fit finite when length separates wins perfectly. Newton's method, in float64."""
    wins = torch.tensor(_wins(policy_scores, baseline_scores), dtype=torch.float64)  # (N,)
    if len(policy_lengths) != len(wins) or len(baseline_lengths) != len(wins):
        raise ValueError("need one policy and one baseline length per score")
    diff = torch.tensor(policy_lengths, dtype=torch.float64) - torch.tensor(baseline_lengths, dtype=torch.float64)
    scale = diff.std(unbiased=False)
    d = diff / scale if scale > 0 else torch.zeros_like(diff)
    x = torch.stack([torch.ones_like(d), d], dim=1)  # (N, 2): intercept, length
    theta = torch.zeros(2, dtype=torch.float64)
    penalty = torch.diag(torch.tensor([0.0, l2], dtype=torch.float64)) * len(wins)
    for _ in range(steps):
        p = torch.sigmoid(x @ theta)  # (N,)
        grad = x.T @ (p - wins) + penalty @ theta  # (2,)
        hess = (x.T * (p * (1 - p))) @ x + penalty + 1e-9 * torch.eye(2, dtype=torch.float64)  # (2, 2)
        step = torch.linalg.solve(hess, grad)
        theta = theta - step
        if float(step.abs().max()) < 1e-10:
            break
    a = float(theta[0])
    return 1.0 / (1.0 + math.exp(-a))


def win_rate_by_length_bucket(policy_scores: Sequence[float], baseline_scores: Sequence[float],
                              policy_lengths: Sequence[int], baseline_lengths: Sequence[int],
                              ratio: float = SIMILAR_LENGTH_RATIO) -> dict[str, tuple[float, int]]:
    """``{"shorter": (win rate, pairs), "similar": ..., "longer": ...}``, bucketed by the policy answer's
    length over the baseline's (``similar`` within a factor of ``ratio``). A bucket without pairs has a NaN
    rate; lengths are counted in characters or tokens as the caller chooses (at least 1 is assumed)."""
    wins = _wins(policy_scores, baseline_scores)
    if len(policy_lengths) != len(wins) or len(baseline_lengths) != len(wins):
        raise ValueError("need one policy and one baseline length per score")
    buckets: dict[str, list[float]] = {"shorter": [], "similar": [], "longer": []}
    for w, lp, lb in zip(wins, policy_lengths, baseline_lengths):
        r = max(lp, 1) / max(lb, 1)
        name = "shorter" if r < 1 / ratio else "longer" if r > ratio else "similar"
        buckets[name].append(w)
    return {k: (sum(v) / len(v) if v else float("nan"), len(v)) for k, v in buckets.items()}
