"""llama2_lightning.rlhf.kl against values worked out by hand (in the comments) or by
independent plain-Python loops; never against the function under test itself."""

from __future__ import annotations

import math

import pytest
import torch
from approx import close

from llama2_lightning.rlhf.kl import kl_penalty

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
