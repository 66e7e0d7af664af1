"""llama2_lightning.rlhf.advantages against values worked out by hand (in the comments) or by
independent plain-Python loops; never against the function under test itself."""

from __future__ import annotations

import pytest
import torch
from approx import F_, T, close

from llama2_lightning.rlhf.advantages import gae

# --- GAE -------------------------------------------------------------------------------------


def test_gae_lambda1_gamma1_is_reward_to_go_minus_value():
    # row 0: prompt at t=0, response t=1..3. row 1: response t=1..2, padding at t=3 (ignored).
    rewards = torch.tensor([[9.0, 1.0, 0.0, 2.0], [0.0, 0.5, 1.5, 5.0]])
    values = torch.tensor([[7.0, 0.5, 1.0, -1.0], [0.0, 2.0, 1.0, 3.0]])
    mask = torch.tensor([[F_, T, T, T], [F_, T, T, F_]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # plain reward-to-go over the response tokens
    rtg = [[0.0] * 4 for _ in range(2)]
    for b in range(2):
        acc = 0.0
        for t in reversed(range(4)):
            if mask[b, t]:
                acc += rewards[b, t].item()
                rtg[b][t] = acc
    assert rtg == [[0.0, 3.0, 2.0, 2.0], [0.0, 2.0, 1.5, 0.0]]
    close(adv, [[0.0, 3.0 - 0.5, 2.0 - 1.0, 2.0 + 1.0], [0.0, 2.0 - 2.0, 1.5 - 1.0, 0.0]])
    close(ret, rtg)  # returns = advantages + values = reward-to-go


def test_gae_discounted_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [4.0, 3.0, 4.0]])
    values = torch.tensor([[0.5, 1.0, -1.0], [1.0, 2.0, 1.0]])
    mask = torch.tensor([[T, T, T], [F_, T, F_]])
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=0.5)  # gamma * lam = 0.25
    # row 0: d2 = 2 + 0 - (-1) = 3            A2 = 3
    #        d1 = 0 + 0.5 * (-1) - 1 = -1.5   A1 = -1.5 + 0.25 * 3 = -0.75
    #        d0 = 1 + 0.5 * 1 - 0.5 = 1.0     A0 = 1.0 + 0.25 * -0.75 = 0.8125
    # row 1: only t=1, terminal: d1 = 3 - 2 = 1
    close(adv, [[0.8125, -0.75, 3.0], [0.0, 1.0, 0.0]])
    close(ret, [[1.3125, 0.25, 2.0], [0.0, 3.0, 0.0]])
    assert not adv.requires_grad


def test_gae_rejects_gapped_mask():
    z = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="contiguous"):
        gae(z, z, torch.tensor([[T, F_, T, F_]]))
