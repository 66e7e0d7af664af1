"""PPO experience for Llama 2's RLHF stage (Touvron et al. 2023, section 3.2.3).

One PPO iteration: ``make_experience`` (numbered steps below) turns the iteration's prompt batch
into a :class:`~llama2_lightning.rlhf.experience.PPOExperience`; ``RLHFModule.ppo_update`` then takes
the clipped PPO steps on it. beta is fixed (paper: 0.01 for 7B/13B, 0.005 for 34B/70B) or, with
``adaptive_kl``, steered towards a target KL (Ziegler et al. 2019). Rewards are whitened over the
rollout whatever the reward function is, so the same callback serves rule rewards and reward models.

Distributed: each data-parallel rank makes experience from its share of the prompts and whitens
over its own share (statistics are not all-reduced; with the paper's 512 prompts a rank still has
64 or more). Held-out evaluation and early stopping are not this callback's job:
``RLHFModule.validation_step`` logs ``val/reward`` and ``val/kl``, and Lightning's ``EarlyStopping``
(``monitor: val/reward``, ``mode: max``) stops on them.

State (``state_dict``): the iteration counter, which seeds the rollout sampling and the minibatch
order, and the KL controller's beta, so a resumed run continues exactly.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from llama2_lightning.rlhf.advantages import gae
from llama2_lightning.rlhf.experience import ExperienceCallback, PPOExperience, RolloutSource, iteration_seed
from llama2_lightning.rlhf.kl import KLKind, sequence_kl
from llama2_lightning.rlhf.kl_control import AdaptiveKLController, FixedKLController
from llama2_lightning.rlhf.masking import masked_mean, masked_whiten
from llama2_lightning.rlhf.reward_shaping import per_token_rewards, whiten_rewards
from llama2_lightning.tensor_parallel import data_parallel_rank


class PPOCallback(ExperienceCallback):
    """Make PPO experience for every iteration (module docstring); its presence makes the run PPO.

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

    uses_value_model = True

    def make_experience(self, trainer: L.Trainer, module: RolloutSource, batch: dict[str, Any]) -> PPOExperience:
        seed = iteration_seed(self.seed, self.iteration, data_parallel_rank(trainer))
        # 1. sample one answer per prompt from the current policy (temperature 1: PPO's ratio needs it)
        t0 = time.perf_counter()
        rollout = module.rollout(batch, seed=seed)
        mask = rollout.action_mask  # (B, T - 1)
        # 2. score each answer: the sequence reward (Llama 2: LOGIT(R_c) of the gated reward models)
        t1 = time.perf_counter()
        parts = module.score(rollout)
        reward = parts["reward"]  # (B,)
        # 3. the log-probs of the answers under the policy and pi_0, and the value of every state
        ev = module.evaluate_rollout(rollout)
        t2 = time.perf_counter()
        # 4. the per-token reward: WHITEN(reward) on each answer's last token - beta * KL_t on every answer
        #    token; summed over an answer it is the paper's R = WHITEN(LOGIT(R_c)) - beta * KL(pi_theta || pi_0)
        seq_reward = whiten_rewards(reward) if self.whiten_rewards and reward.numel() > 1 else reward
        beta = self.kl_controller.beta
        rewards = per_token_rewards(seq_reward, ev["logprobs"], ev["ref_logprobs"], mask, beta,
                                    self.kl_estimator)  # (B, T - 1)
        # 5. advantages and value targets by GAE, the advantages whitened over the answer tokens
        advantages, returns = gae(rewards, ev["values"], mask, self.gamma, self.lam)
        advantage_mean = float(masked_mean(advantages, mask))  # before whitening: is the policy beating V?
        if self.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        # 6. beta follows the KL of the rollout just taken, counted in samples (Ziegler et al.)
        kl = sequence_kl(ev["logprobs"], ev["ref_logprobs"], mask)  # (B,) nats
        kl_k3 = sequence_kl(ev["logprobs"], ev["ref_logprobs"], mask, "k3")  # (B,)
        self.kl_controller.update(float(kl.mean()), n_steps=int(mask.size(0)))

        stats = {
            "reward": float(reward.mean()),
            "reward_std": float(reward.std()) if reward.numel() > 1 else 0.0,
            "kl": float(kl.mean()),
            "kl_k3": float(kl_k3.mean()),
            "beta": beta,
            "kl_penalty": float(beta * kl.mean()),
            "response_length": float(rollout.answer_lengths.float().mean()),
            "eos_fraction": float(sum(bool(a) and a[-1] == module.tokenizer.eos_id for a in rollout.answer_ids)
                                  / len(rollout.answer_ids)),
            "advantage_mean": advantage_mean,
            "return_mean": float(masked_mean(returns, mask)),
            "iteration": float(self.iteration),
            "time/generation_s": t1 - t0,
            "time/scoring_s": t2 - t1,
            **{f"reward_{k}": float(v.mean()) for k, v in parts.items() if k != "reward"},
        }
        return PPOExperience(tokens=rollout.tokens, lengths=rollout.lengths, action_mask=mask,
                             old_logprobs=ev["logprobs"], old_values=ev["values"], rewards=rewards,
                             advantages=advantages, returns=returns, seed=seed, stats=stats)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        hp = pl_module.hparams
        if hp.get("temperature", 1.0) != 1.0 or hp.get("top_p", 1.0) < 1.0 or hp.get("top_k") is not None:
            rank_zero_warn("PPOCallback: the module samples with temperature/top_p/top_k other than 1/1/None, so "
                           "rollouts do not come from the policy whose log-probs the ratio uses")

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


__all__ = ["PPOCallback"]
