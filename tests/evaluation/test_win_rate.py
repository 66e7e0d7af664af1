"""Length-controlled win rates (llama2_lightning.evaluation.win_rate) against a brute-force fit and by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llama2_lightning.evaluation.win_rate import length_controlled_win_rate, win_rate, win_rate_by_length_bucket


def brute_force_intercept(wins: np.ndarray, d: np.ndarray, l2: float) -> float:
    """The penalised maximum-likelihood intercept by a grid search: independent of the Newton solver."""
    best, best_ll = 0.0, -math.inf
    for a in np.linspace(-4, 4, 321):
        for b in np.linspace(-8, 8, 321):
            z = a + b * d
            ll = float(np.sum(wins * z - np.logaddexp(0, z))) - 0.5 * l2 * len(d) * b * b
            if ll > best_ll:
                best, best_ll = a, ll
    return best


def test_win_rate_counts_ties_half() -> None:
    assert win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, -1.0]) == pytest.approx(2.5 / 4)
    with pytest.raises(ValueError, match="equally many"):
        win_rate([1.0], [1.0, 2.0])


def test_a_length_hack_does_not_pass_as_a_gain() -> None:
    # The judge prefers shorter answers and nothing else (the win probability depends on the length
    # difference only), and the policy mostly answers shorter: a raw win rate well above 50%, but at equal
    # length the fit predicts a coin flip.
    rng = np.random.default_rng(0)
    n = 2000
    base_len = rng.integers(50, 150, size=n)
    diff = np.where(rng.random(n) < 0.75, -rng.integers(5, 60, size=n), rng.integers(5, 60, size=n))
    wins = (rng.random(n) < 1 / (1 + np.exp(0.08 * diff))).astype(float)
    raw = win_rate(wins.tolist(), [0.5] * n)
    lc = length_controlled_win_rate(wins.tolist(), [0.5] * n, (base_len + diff).tolist(), base_len.tolist())
    assert raw > 0.65
    assert lc == pytest.approx(0.5, abs=0.05)


def test_matches_brute_force_fit_when_length_matters_partly() -> None:
    rng = np.random.default_rng(1)
    n = 300
    diff = rng.normal(0, 30, size=n)
    p = 1 / (1 + np.exp(-(0.8 - 0.04 * diff)))  # a real gain (intercept 0.8) plus a length effect
    wins = (rng.random(n) < p).astype(float)
    lc = length_controlled_win_rate(wins.tolist(), [0.5] * n, (100 + diff).round().astype(int).tolist(), [100] * n)
    d_int = ((100 + diff).round() - 100)
    d = d_int / d_int.std()
    expected = 1 / (1 + math.exp(-brute_force_intercept(wins, d, l2=1e-3)))
    assert lc == pytest.approx(expected, abs=0.01)
    assert lc > 0.6  # the real gain survives the length control


def test_without_a_length_effect_lc_stays_near_raw() -> None:
    rng = np.random.default_rng(2)
    wins = (rng.random(500) < 0.7).astype(float)
    lens = rng.integers(20, 200, size=500).tolist()
    lc = length_controlled_win_rate(wins.tolist(), [0.5] * 500, lens, rng.integers(20, 200, size=500).tolist())
    assert lc == pytest.approx(win_rate(wins.tolist(), [0.5] * 500), abs=0.03)


def test_buckets_by_hand() -> None:
    out = win_rate_by_length_bucket([1, 0, 1, 1, 0], [0, 1, 0, 0, 1], [10, 10, 100, 30, 60], [100, 100, 100, 20, 40])
    assert out["shorter"] == (0.5, 2)  # 10 vs 100 twice: one win
    assert out["similar"] == (1.0, 1)  # 100 vs 100
    assert out["longer"] == (0.5, 2)  # 30/20 = 1.5 and 60/40 = 1.5
    assert math.isnan(win_rate_by_length_bucket([1], [0], [10], [10])["longer"][0])
