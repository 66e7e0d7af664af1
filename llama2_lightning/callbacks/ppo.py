"""PPO experience for Llama 2's RLHF stage (Touvron et al. 2023, section 3.2.3).

Each training epoch is one PPO iteration over one batch of prompts (``RLHFModule`` docstring). Before
the module's ``training_step``, this callback

1. samples one answer per prompt from the current policy (KV cache, eval mode, temperature 1);
2. scores it with the module's reward function (for Llama 2: ``LOGIT(R_c)`` of the gated reward models);
3. computes the policy's log-probs, the reference's, and the value model's values on the answer;
4. builds the per-token reward ``WHITEN(reward)`` on the last answer token ``- beta * KL_t`` on every
   answer token (``rlhf.per_token_rewards``; the sum over a response is the paper's
   ``R = WHITEN(LOGIT(R_c)) - beta * KL(pi_theta || pi_0)``);
5. runs GAE (``gamma``, ``lam``) and whitens the advantages over the rollout;
6. hands the result to the module (``set_experience``), which takes the clipped PPO steps.

beta is fixed (paper: 0.01 for 7B/13B, 0.005 for 34B/70B) or, with ``adaptive_kl``, steered towards
a target KL (Ziegler et al. 2019). Rewards are whitened over the rollout whatever the reward function
is, so the same callback serves rule rewards and reward models.

Distributed: each data-parallel rank makes experience from its share of the prompts and whitens
over its own share (statistics are not all-reduced; with the paper's 512 prompts a rank still has
64 or more).

Held-out evaluation and early stopping are not this callback's job: ``RLHFModule.validation_step``
logs ``val/reward`` and ``val/kl`` on the held-out prompts, and Lightning's ``EarlyStopping``
(``monitor: val/reward``, ``mode: max``, ``patience``) stops on them and carries its own state.

State (``state_dict``): the iteration counter, which seeds the rollout sampling and the minibatch
order, and the KL controller's beta, so a resumed run continues exactly.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import numpy as np
import torch

from llama2_lightning.rlhf.advantages import gae
from llama2_lightning.rlhf.kl import KLKind, kl_penalty
from llama2_lightning.rlhf.kl_control import AdaptiveKLController, FixedKLController
from llama2_lightning.rlhf.masking import masked_mean, masked_whiten
from llama2_lightning.rlhf.reward_shaping import per_token_rewards, whiten_rewards
from llama2_lightning.tensor_parallel import data_parallel_rank


def iteration_seed(seed: int, iteration: int, rank: int) -> int:
    """A seed for one (iteration, rank), independent of the others and of the global RNG."""
    return int(np.random.SeedSequence([seed, iteration, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


class PPOCallback(L.Callback):
    """Make PPO experience at the start of every iteration (module docstring).

    Args:
        kl_coef: beta of ``- beta * KL`` (paper: 0.01 for 7B/13B, 0.005 for 34B/70B); with
            ``adaptive_kl`` it is the starting value.
        adaptive_kl: ``{target: KL in nats per sequence, horizon: samples}`` for Ziegler et al.'s
            controller; ``None`` (the paper) keeps beta fixed.
        kl_estimator: per-token KL inside the reward: ``k1`` (unbiased; the paper's sum) or ``abs``,
            ``mse``, ``k3`` (see ``rlhf.kl_penalty``).
        whiten_rewards: WHITEN the sequence rewards over the rollout (paper: yes).
        gamma / lam: GAE discount and lambda (the paper does not state them; 1.0 and 0.95 are the
            usual choice for a single-episode response).
        whiten_advantages: standardise the advantages over the rollout's answer tokens.
        seed: base of the rollout sampling and minibatch seeds.
    """

    def __init__(self, kl_coef: float = 0.01, adaptive_kl: dict[str, float] | None = None,
                 kl_estimator: KLKind = "k1", whiten_rewards: bool = True, gamma: float = 1.0, lam: float = 0.95,
                 whiten_advantages: bool = True, seed: int = 0) -> None:
        if adaptive_kl is not None:
            unknown = set(adaptive_kl) - {"target", "horizon"}
            if unknown or "target" not in adaptive_kl:
                raise ValueError(f"adaptive_kl takes keys target (required) and horizon; got {sorted(adaptive_kl)}")
            self.kl_controller: FixedKLController | AdaptiveKLController = AdaptiveKLController(
                kl_coef, float(adaptive_kl["target"]), int(adaptive_kl.get("horizon", 10_000)))
        else:
            self.kl_controller = FixedKLController(kl_coef)
        if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
            raise ValueError(f"gamma and lam must be in [0, 1], got {gamma}, {lam}")
        self.kl_estimator = kl_estimator
        self.whiten_rewards = whiten_rewards
        self.gamma, self.lam = gamma, lam
        self.whiten_advantages = whiten_advantages
        self.seed = seed
        self.iteration = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        from llama2_lightning.modules.rlhf import PPOExperience

        seed = iteration_seed(self.seed, self.iteration, data_parallel_rank(trainer))
        t0 = time.perf_counter()
        rollout = pl_module.rollout(batch, seed=seed)
        t1 = time.perf_counter()
        parts = pl_module.score(rollout)
        ev = pl_module.evaluate_rollout(rollout, values=True)
        t2 = time.perf_counter()

        mask = rollout.action_mask  # (B, T - 1)
        reward = parts["reward"]  # (B,)
        seq_reward = whiten_rewards(reward) if self.whiten_rewards and reward.numel() > 1 else reward
        beta = self.kl_controller.beta
        rewards = per_token_rewards(seq_reward, ev["logprobs"], ev["ref_logprobs"], mask, beta,
                                    self.kl_estimator)  # (B, T - 1)
        advantages, returns = gae(rewards, ev["values"], mask, self.gamma, self.lam)
        advantage_mean = float(masked_mean(advantages, mask))  # before whitening: is the policy beating V?
        if self.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        kl_tok = kl_penalty(ev["logprobs"], ev["ref_logprobs"], "k1")  # (B, T - 1)
        kl_seq = torch.where(mask, kl_tok, 0.0).sum(dim=1)  # (B,) sequence KL estimate, nats
        kl_k3 = torch.where(mask, kl_penalty(ev["logprobs"], ev["ref_logprobs"], "k3"), 0.0).sum(dim=1)
        # Ziegler et al. update beta with the KL of the rollout just taken, counted in samples.
        self.kl_controller.update(float(kl_seq.mean()), n_steps=int(mask.size(0)))

        stats = {
            "reward": float(reward.mean()),
            "reward_std": float(reward.std()) if reward.numel() > 1 else 0.0,
            "kl": float(kl_seq.mean()),
            "kl_k3": float(kl_k3.mean()),
            "beta": beta,
            "kl_penalty": float(beta * kl_seq.mean()),
            "response_length": float(rollout.answer_lengths.float().mean()),
            "eos_fraction": float(sum(bool(a) and a[-1] == pl_module.tokenizer.eos_id for a in rollout.answer_ids)
                                  / len(rollout.answer_ids)),
            "advantage_mean": advantage_mean,
            "return_mean": float(masked_mean(returns, mask)),
            "iteration": float(self.iteration),
            "time/generation_s": t1 - t0,
            "time/scoring_s": t2 - t1,
        }
        stats.update({f"reward_{k}": float(v.mean()) for k, v in parts.items() if k != "reward"})
        pl_module.set_experience(PPOExperience(
            tokens=rollout.tokens, lengths=rollout.lengths, action_mask=mask, old_logprobs=ev["logprobs"],
            old_values=ev["values"], rewards=rewards, advantages=advantages, returns=returns,
            batch_index=batch["index"], seed=seed, stats=stats,
        ))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.iteration += 1

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "kl_controller": self.kl_controller.state_dict(),
                "kl_controller_type": type(self.kl_controller).__name__}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        kind = state_dict.get("kl_controller_type", type(self.kl_controller).__name__)
        if kind != type(self.kl_controller).__name__:
            raise ValueError(f"the checkpoint's PPO run used a {kind}, this config a "
                             f"{type(self.kl_controller).__name__}: keep adaptive_kl as it was to resume")
        self.iteration = int(state_dict["iteration"])
        self.kl_controller.load_state_dict(state_dict["kl_controller"])


__all__ = ["PPOCallback", "iteration_seed"]
