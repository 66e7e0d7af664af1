"""llama2_lightning.rlhf.masking against values worked out by hand (in the comments) or by
independent plain-Python loops; never against the function under test itself."""

from __future__ import annotations

import math

import pytest
import torch
from approx import F_, T, close

from llama2_lightning.rlhf.masking import masked_mean, masked_var, masked_whiten

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
