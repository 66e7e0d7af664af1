"""llama2_lightning.rlhf.ppo against values worked out by hand (in the comments) or by
independent plain-Python loops; never against the function under test itself."""

from __future__ import annotations

import math

import torch
from approx import F_, T, close

from llama2_lightning.rlhf.ppo import entropy_from_logits, ppo_policy_loss, ppo_value_loss

# --- PPO -------------------------------------------------------------------------------------


def test_ppo_policy_loss_clipping_and_gradients():
    # ratios 1.5, 1.5, 0.5, 0.5 with advantages +1, -1, -1, +1; eps 0.2; t=4 is padding.
    old = torch.tensor([[-1.0, -2.0, -1.0, -0.5, -3.0]])
    log_ratio = torch.tensor([[math.log(1.5), math.log(1.5), math.log(0.5), math.log(0.5), 5.0]])
    logprobs = (old + log_ratio).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0, 100.0]])
    mask = torch.tensor([[T, T, T, T, F_]])
    loss, stats = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    # per token -min(r A, clip(r) A): -min(1.5, 1.2) = -1.2 | -min(-1.5, -1.2) = 1.5
    #                                  -min(-0.5, -0.8) = 0.8 | -min(0.5, 0.8) = -0.5
    close(loss, (-1.2 + 1.5 + 0.8 - 0.5) / 4, atol=1e-6)
    loss.backward()
    # clipped tokens (ratio past the clip in the advantage's direction) get zero gradient; the others
    # d(-r A)/d logp = -r A, divided by the 4 tokens of the mean.
    close(logprobs.grad, [[0.0, 1.5 / 4, 0.0, -0.5 / 4, 0.0]])
    close(stats["clip_fraction"], 0.5)  # tokens 0 and 2
    close(stats["ratio_mean"], 1.0)
    # k3 of KL(old || new) with l = log ratio: e^l - 1 - l
    k3 = [0.5 - math.log(1.5)] * 2 + [-0.5 - math.log(0.5)] * 2
    close(stats["approx_kl"], sum(k3) / 4)


def test_ppo_policy_loss_on_policy_equals_minus_mean_advantage():
    lp = torch.tensor([[-1.0, -2.0, -3.0]])
    loss, stats = ppo_policy_loss(lp, lp, torch.tensor([[2.0, -1.0, 7.0]]), torch.tensor([[T, T, F_]]))
    close(loss, -(2.0 - 1.0) / 2)  # ratio 1 -> loss = -mean(A) over the mask
    close(stats["clip_fraction"], 0.0)
    close(stats["approx_kl"], 0.0)


def test_ppo_value_loss_clipping():
    old = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    values = torch.tensor([[1.5, 1.5, 1.1, 1.0, 9.0]], requires_grad=True)
    returns = torch.tensor([[2.0, 0.0, 2.0, 1.05, -9.0]])
    mask = torch.tensor([[T, T, T, T, F_]])
    loss, stats = ppo_value_loss(values, old, returns, mask, clip_eps=0.2)
    # t0: v 1.5 -> clipped 1.2; errors (1.5-2)^2 = 0.25, (1.2-2)^2 = 0.64 -> 0.64 (clipped wins)
    # t1: v 1.5 -> 1.2; errors 2.25, 1.44 -> 2.25 ; t2: inside the clip, 0.81 ; t3: 0.0025
    close(loss, 0.5 * (0.64 + 2.25 + 0.81 + 0.0025) / 4, atol=1e-6)
    loss.backward()
    # d/dv of 0.5 * err / 4: clipped t0 -> 0; t1 -> 2 * 1.5 / 8; t2 -> 2 * -0.9 / 8; t3 -> 2 * -0.05 / 8
    close(values.grad, [[0.0, 0.375, -0.225, -0.0125, 0.0]], atol=1e-6)
    close(stats["clip_fraction"], 0.25)


def test_entropy_from_logits():
    inf = float("inf")
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, -inf, -inf, -inf], [0.0, math.log(3.0), -inf, -inf]]])
    # uniform over 4: ln 4 ; one-hot: 0 ; probs (1/4, 3/4): -(1/4 ln 1/4 + 3/4 ln 3/4)
    h2 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    close(entropy_from_logits(logits), (math.log(4.0) + 0.0 + h2) / 3, atol=1e-6)
    close(entropy_from_logits(logits, torch.tensor([[T, F_, T]])), (math.log(4.0) + h2) / 2, atol=1e-6)
