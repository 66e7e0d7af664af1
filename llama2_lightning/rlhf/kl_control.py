"""The KL coefficient beta of the RLHF reward ``R = R~_c - beta * KL`` (section 3.2.3).

Llama 2 keeps beta fixed (0.01 for 7B/13B, 0.005 for 34B/70B): ``FixedKLController``. The adaptive
controller of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences") is
offered with the same interface for runs that target a KL budget instead. Both carry their
state through ``state_dict`` / ``load_state_dict`` so a resumed PPO run continues with the same beta.
"""

from __future__ import annotations

from typing import Any


class FixedKLController:
    """Constant beta, the paper's choice (section 3.2.3); ``update`` is a no-op kept for interface parity."""

    def __init__(self, beta: float) -> None:
        if beta < 0:
            raise ValueError(f"FixedKLController: beta must be >= 0, got {beta}")
        self.beta = float(beta)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.beta

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = float(state["beta"])


class AdaptiveKLController:
    """Proportional controller steering the observed KL towards ``target`` (Ziegler et al. 2019).

    ``e = clip(KL / target - 1, -0.2, 0.2)`` and ``beta <- beta * (1 + e * n_steps / horizon)``:
    too much KL raises beta, too little lowers it. The clip bounds each step's change so one noisy
    rollout cannot swing beta, and ``horizon`` (in samples) sets how fast it reacts.
    """

    def __init__(self, init_beta: float, target: float, horizon: int) -> None:
        if init_beta <= 0:
            raise ValueError(f"AdaptiveKLController: init_beta must be > 0 (a zero beta never moves), got {init_beta}")
        if target <= 0:
            raise ValueError(f"AdaptiveKLController: target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"AdaptiveKLController: horizon must be > 0, got {horizon}")
        self.beta = float(init_beta)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Adjust beta after ``n_steps`` samples whose mean sequence KL was ``current_kl``; returns the new beta."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = float(state["beta"])
        self.target = float(state.get("target", self.target))
        self.horizon = int(state.get("horizon", self.horizon))
