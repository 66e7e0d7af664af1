"""llama2_lightning.rlhf.reward_shaping against values worked out by hand (in the comments) or by
independent plain-Python loops; never against the function under test itself."""

from __future__ import annotations

import math

import pytest
import torch
from approx import F_, T, close

from llama2_lightning.rlhf.reward_shaping import (
    combine_rewards, llama2_reward, logit, per_token_rewards, whiten_rewards,
)

# --- Llama 2 reward ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_combine_rewards_gating_and_threshold_boundary(dtype):
    r_h = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.9, 0.2], dtype=dtype)
    r_s = torch.tensor([0.5, 0.1, 0.15, 0.149, 0.8, 0.7], dtype=dtype)
    tagged = torch.tensor([T, F_, F_, F_, F_, T])
    # tagged -> R_s ; 0.1 < 0.15 -> R_s ; 0.15 is not < 0.15 -> R_h ; 0.149 -> R_s ; 0.8 -> R_h ; tagged -> R_s
    close(combine_rewards(r_h, r_s, tagged), [0.5, 0.1, 0.9, 0.149, 0.9, 0.7])


def test_combine_rewards_rejects_raw_scores():
    with pytest.raises(ValueError, match="sigmoid"):
        combine_rewards(torch.tensor([2.5]), torch.tensor([0.3]), torch.tensor([F_]))


def test_logit_by_hand_and_clamped():
    out = logit(torch.tensor([0.5, 0.75, 0.1, 0.0, 1.0]), eps=1e-6)
    # p = 0 and p = 1 clamp to log(eps) - log(1) and its negation, symmetric even in float32
    close(out, [0.0, math.log(3.0), math.log(0.1 / 0.9), math.log(1e-6), -math.log(1e-6)], atol=1e-5)
    assert torch.isfinite(out).all()


def test_whiten_rewards_by_hand():
    # mean 3, unbiased variance (4 + 1 + 0 + 9) / 3 = 14/3
    s = math.sqrt(14.0 / 3.0)
    close(whiten_rewards(torch.tensor([1.0, 2.0, 3.0, 6.0])), [-2 / s, -1 / s, 0.0, 3 / s], atol=1e-6)


def test_llama2_reward_composes_gate_logit_whiten():
    # gating: row 0 keeps R_h = 0.75 (R_s 0.9 >= 0.15, untagged); row 1 takes R_s = 0.1 (< 0.15).
    # Two values a, b whiten to +-|a-b|/2 / (|a-b|/sqrt 2) = +-1/sqrt 2; logit(0.75) > logit(0.1).
    out = llama2_reward(torch.tensor([0.75, 0.5]), torch.tensor([0.9, 0.1]), torch.tensor([F_, F_]))
    close(out, [1 / math.sqrt(2), -1 / math.sqrt(2)], atol=1e-6)
    # tagging row 0 as safety switches it to R_s = 0.9, still the larger logit -> same signs
    out = llama2_reward(torch.tensor([0.05, 0.5]), torch.tensor([0.9, 0.1]), torch.tensor([T, F_]))
    close(out, [1 / math.sqrt(2), -1 / math.sqrt(2)], atol=1e-6)


def test_per_token_rewards_last_token_of_each_row():
    # response spans: row 0 t=1..3, row 1 t=2..4, row 2 t=1 only; 9s sit outside the mask.
    diff = torch.tensor(
        [[9.0, 0.5, -0.2, 0.1, 9.0], [9.0, 9.0, 1.0, 0.0, 0.3], [9.0, 2.0, 9.0, 9.0, 9.0]]
    )  # logp - ref
    ref = torch.full((3, 5), -2.0)
    mask = torch.tensor([[F_, T, T, T, F_], [F_, F_, T, T, T], [F_, T, F_, F_, F_]])
    out = per_token_rewards(torch.tensor([1.0, -2.0, 0.5]), ref + diff, ref, mask, beta=0.1)
    expected = [
        [0.0, -0.05, 0.02, -0.01 + 1.0, 0.0],
        [0.0, 0.0, -0.1, 0.0, -0.03 - 2.0],
        [0.0, -0.2 + 0.5, 0.0, 0.0, 0.0],
    ]
    close(out, expected, atol=1e-6)
    # each row sums to R = R~_c - beta * sum_t KL_t
    close(out.sum(dim=1), [1.0 - 0.1 * 0.4, -2.0 - 0.1 * 1.3, 0.5 - 0.1 * 2.0], atol=1e-6)


def test_per_token_rewards_rejects_empty_response():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        per_token_rewards(torch.zeros(2), z, z, torch.tensor([[T, T, F_], [F_, F_, F_]]), beta=0.01)
