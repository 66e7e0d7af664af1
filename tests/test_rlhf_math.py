"""The RLHF math of llama2_lightning.rlhf against values worked out by hand (in the comments) or by
independent plain-Python loops; never against the function under test itself."""

from __future__ import annotations

import math

import pytest
import torch

from llama2_lightning.rlhf import (
    MARGINS,
    AdaptiveKLController,
    FixedKLController,
    combine_rewards,
    entropy_from_logits,
    gae,
    kl_penalty,
    llama2_reward,
    logit,
    margin_for,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    ranking_loss,
    whiten_rewards,
)

T, F_ = True, False


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# --- masking ---------------------------------------------------------------------------------

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]])
M = torch.tensor([[T, T, F_], [T, F_, F_]])  # selects 1, 2, 4


def test_masked_mean_global_and_per_dim():
    close(masked_mean(X, M), 7.0 / 3.0)  # (1 + 2 + 4) / 3
    close(masked_mean(X, M, dim=1), [1.5, 4.0])  # rows: (1+2)/2, 4/1
    close(masked_mean(X, M, dim=0), [2.5, 2.0, 0.0])  # cols: (1+4)/2, 2/1, empty -> 0


def test_masked_var_by_hand():
    # deviations from 7/3: -4/3, -1/3, 5/3; squares sum to (16 + 1 + 25) / 9 = 14/3
    close(masked_var(X, M, unbiased=True), (14.0 / 3.0) / 2.0)
    close(masked_var(X, M, unbiased=False), (14.0 / 3.0) / 3.0)
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(X, torch.tensor([[T, F_, F_], [F_, F_, F_]]))


def test_masked_whiten_values_and_zeroed_padding():
    out = masked_whiten(X, M)
    std = math.sqrt(7.0 / 3.0)
    mean = 7.0 / 3.0
    expected = [[(1 - mean) / std, (2 - mean) / std, 0.0], [(4 - mean) / std, 0.0, 0.0]]
    close(out, expected, atol=1e-5)
    scale_only = masked_whiten(X, M, shift_mean=False)
    expected_scaled = [[(1 - mean) / std + mean, (2 - mean) / std + mean, 0.0], [(4 - mean) / std + mean, 0.0, 0.0]]
    close(scale_only, expected_scaled, atol=1e-5)


def test_masked_whiten_zero_mean_unit_variance_over_mask_only():
    torch.manual_seed(0)
    x = torch.randn(3, 7) * 5 + 2
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 2:6] = True
    mask[1, 1:3] = True
    mask[2, 4:7] = True
    out = masked_whiten(x, mask)
    picked = [out[b, t].item() for b in range(3) for t in range(7) if mask[b, t]]
    n = len(picked)
    mean = sum(picked) / n
    var = sum((v - mean) ** 2 for v in picked) / (n - 1)
    assert abs(mean) < 1e-5 and abs(var - 1.0) < 1e-4
    assert torch.all(out[~mask] == 0)
    # Masked-out entries must not influence anything, not even when they are inf or nan.
    poisoned = x.clone()
    poisoned[~mask] = torch.tensor([1e6, float("nan"), float("-inf")]).repeat(21)[: int((~mask).sum())]
    assert torch.equal(masked_whiten(poisoned, mask), out)
    assert torch.equal(masked_mean(poisoned, mask), masked_mean(x, mask))


def test_masked_whiten_single_entry_is_zero_not_nan():
    out = masked_whiten(torch.tensor([5.0, 9.0]), torch.tensor([T, F_]))
    close(out, [0.0, 0.0])


# --- KL estimators ---------------------------------------------------------------------------

LOGP = torch.tensor([[-1.0, -2.0, -0.3]])
REF = torch.tensor([[-1.5, -1.0, -0.3]])  # logp - ref = 0.5, -1.0, 0.0


def test_kl_estimators_by_hand():
    close(kl_penalty(LOGP, REF, "k1"), [[0.5, -1.0, 0.0]])
    close(kl_penalty(LOGP, REF, "abs"), [[0.5, 1.0, 0.0]])
    close(kl_penalty(LOGP, REF, "mse"), [[0.125, 0.5, 0.0]])  # 0.5 * diff^2
    # log r = ref - logp = -0.5, 1.0, 0 ; k3 = (r - 1) - log r
    close(kl_penalty(LOGP, REF, "k3"), [[math.exp(-0.5) - 1 + 0.5, math.e - 1 - 1.0, 0.0]])
    close(kl_penalty(LOGP, REF, "k3"), [[0.10653066, 0.71828183, 0.0]])
    assert kl_penalty(LOGP, REF).tolist() == kl_penalty(LOGP, REF, "k1").tolist()  # k1 is the default


def test_k3_nonnegative_and_unknown_kind():
    torch.manual_seed(1)
    a, b = torch.randn(4, 50) * 3, torch.randn(4, 50) * 3
    assert torch.all(kl_penalty(a, b, "k3") >= 0)
    with pytest.raises(ValueError, match="k1, abs, mse, k3"):
        kl_penalty(a, b, "k2")  # type: ignore[arg-type]


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


def test_adaptive_kl_controller_moves_beta_toward_target():
    ctl = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10_000)
    # KL 12 is double the target: error clips to +0.2, beta *= 1 + 0.2 * 1000/10000 = 1.02
    assert ctl.update(12.0, n_steps=1000) == pytest.approx(0.102)
    # KL 3 is half: error -0.5 clips to -0.2, beta *= 0.98
    assert ctl.update(3.0, n_steps=1000) == pytest.approx(0.102 * 0.98)
    # KL 6.6: error +0.1 unclipped, beta *= 1.01
    assert ctl.update(6.6, n_steps=1000) == pytest.approx(0.102 * 0.98 * 1.01)
    resumed = AdaptiveKLController(init_beta=1.0, target=1.0, horizon=1)
    resumed.load_state_dict(ctl.state_dict())
    assert (resumed.beta, resumed.target, resumed.horizon) == (ctl.beta, 6.0, 10_000)


def test_fixed_kl_controller_is_constant():
    ctl = FixedKLController(0.01)  # the paper's beta for 7B / 13B
    assert ctl.update(100.0, n_steps=512) == 0.01
    other = FixedKLController(0.5)
    other.load_state_dict(ctl.state_dict())
    assert other.beta == 0.01


# --- reward-model ranking loss ----------------------------------------------------------------


def softplus(x: float) -> float:  # -log sigmoid(-x)
    return math.log1p(math.exp(x))


R_C = torch.tensor([2.0, 0.5, 1.0])
R_R = torch.tensor([1.0, 1.0, 1.0])
LABELS = ["significantly_better", "better", None]


def test_margin_tables():
    close(margin_for(LABELS, "small"), [1.0, 2.0 / 3.0, 0.0])
    close(margin_for(LABELS, "large"), [3.0, 2.0, 0.0])
    close(margin_for(LABELS, "none"), [0.0, 0.0, 0.0])
    assert MARGINS["small"]["slightly_better"] == pytest.approx(1 / 3) and MARGINS["large"]["negligibly_better"] == 0.0


def test_margin_for_errors_name_label_and_allowed():
    allowed = "significantly_better, better, slightly_better, negligibly_better"
    with pytest.raises(ValueError, match=rf"'much_better' at index 1; allowed: {allowed}"):
        margin_for(["better", "much_better"], "small")
    with pytest.raises(ValueError, match="small, large, none"):
        margin_for(["better"], "huge")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("table", "gaps"),
    [
        # gap = r_c - r_r - m
        ("small", [2.0 - 1.0 - 1.0, 0.5 - 1.0 - 2.0 / 3.0, 0.0]),
        ("large", [2.0 - 1.0 - 3.0, 0.5 - 1.0 - 2.0, 0.0]),
        ("none", [1.0, -0.5, 0.0]),
    ],
)
def test_ranking_loss_by_hand(table, gaps):
    expected = sum(softplus(-g) for g in gaps) / 3  # -log sigmoid(g) = log(1 + e^-g)
    close(ranking_loss(R_C, R_R, margin_for(LABELS, table)), expected, atol=1e-6)


def test_ranking_loss_zero_margin_is_bradley_terry_and_stable():
    # margin 0 / None: plain Bradley-Terry, -log sigmoid(r_c - r_r); gap 0 gives ln 2
    close(ranking_loss(torch.tensor([1.0]), torch.tensor([1.0])), 0.6931471805599453)
    close(ranking_loss(R_C, R_R), ranking_loss(R_C, R_R, torch.zeros(3)))
    close(ranking_loss(R_C, R_R), (softplus(-1.0) + softplus(0.5) + math.log(2.0)) / 3, atol=1e-6)
    # a huge wrong-way gap stays finite: -log sigmoid(-1000) = 1000
    close(ranking_loss(torch.tensor([0.0]), torch.tensor([1000.0])), 1000.0)
