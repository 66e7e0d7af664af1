"""llama2_lightning.rlhf.kl_control against values worked out by hand (in the comments) or by
independent plain-Python loops; never against the function under test itself."""

from __future__ import annotations

import pytest

from llama2_lightning.rlhf.kl_control import AdaptiveKLController, FixedKLController


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
