"""PPO experience for Llama 2's RLHF stage (Touvron et al. 2023, section 3.2.3).

One PPO iteration: ``make_experience`` (numbered steps below) turns the iteration's prompt batch
into a :class:`~llama2_lightning.rlhf.experience.PPOExperience`; ``RLHFModule.ppo_update`` then takes
the clipped PPO steps on it. beta is fixed (paper: 0.01 for 7B/13B, 0.005 for 34B/70B) or, with
``adaptive_kl``, steered towards a target KL (Ziegler et al. 2019). Rewards are whitened over the
rollout whatever the reward function is, so the same callback serves rule rewards and reward models.

Distributed: each data-parallel rank makes experience from its share of the prompts, but every
statistic is over the whole data-parallel batch (the paper's 512 prompts, not a rank's 8 or 64):
rewards and advantages are whitened with the global mean and variance, the logged reward, KL and
lengths are global means, and the adaptive controller follows the global KL, so every rank keeps the
same beta (``rlhf/global_stats.py``: sums and counts all-reduced over the data-parallel group only;
the ranks of a tensor-parallel group hold the same rows). Held-out evaluation and early stopping are not this callback's job:
``RLHFModule.validation_step`` logs ``val/reward`` and ``val/kl``, and Lightning's ``EarlyStopping``
(``monitor: val/reward``, ``mode: max``) stops on them.

State (``state_dict``): the iteration counter, which seeds the rollout sampling and the minibatch
order, and the KL controller's beta, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from llama2_lightning.rlhf.advantages import gae
from llama2_lightning.rlhf.experience import ExperienceCallback, PPOExperience, RolloutSource, iteration_seed
from llama2_lightning.rlhf.kl import KLKind, sequence_kl
from llama2_lightning.rlhf.kl_control import AdaptiveKLController, FixedKLController
from llama2_lightning.rlhf.global_stats import (
    global_masked_moments, global_masked_whiten, global_means, global_whiten_rewards,
)
from llama2_lightning.rlhf.reward_shaping import per_token_rewards
from llama2_lightning.tensor_parallel import data_parallel_group, data_parallel_rank


class PPOCallback(ExperienceCallback):
    """Make PPO experience for every iteration (module docstring); its presence makes the run PPO.

    Args:
        kl_coef: beta of ``- beta * KL`` (paper: 0.01 for 7B/13B, 0.005 for 34B/70B); with
            ``adaptive_kl`` it is the starting value.
        adaptive_kl: ``{target: KL in nats per sequence, horizon: samples}`` for Ziegler et al.'s
            controller; ``None`` (the paper) keeps beta fixed.
        kl_estimator: per-token KL inside the reward: ``k1`` (unbiased; the paper's sum) or ``abs``,
            ``mse``, ``k3`` (see ``rlhf.kl_penalty``).
        whiten_rewards: WHITEN the sequence rewards over the iteration's rollouts, all ranks' (paper: yes).
        gamma / lam: GAE discount and lambda (the paper does not state them; 1.0 and 0.95 are the
            usual choice for a single-episode response).
        whiten_advantages: standardise the advantages over the iteration's answer tokens, all ranks'.
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
        #    token; summed over an answer it is the paper's R = WHITEN(LOGIT(R_c)) - beta * KL(pi_theta || pi_0).
        #    WHITEN's mean and variance are those of every data-parallel rank's rollouts together.
        group = data_parallel_group(trainer)
        reward_mean, reward_var, n_rows = global_masked_moments(reward, torch.ones_like(reward, dtype=torch.bool),
                                                                group)
        seq_reward = global_whiten_rewards(reward, group=group) if self.whiten_rewards and n_rows > 1 else reward
        beta = self.kl_controller.beta
        rewards = per_token_rewards(seq_reward, ev["logprobs"], ev["ref_logprobs"], mask, beta,
                                    self.kl_estimator)  # (B, T - 1)
        # 5. advantages and value targets by GAE, the advantages whitened over every rank's answer tokens
        advantages, returns = gae(rewards, ev["values"], mask, self.gamma, self.lam)
        kl = sequence_kl(ev["logprobs"], ev["ref_logprobs"], mask)  # (B,) nats
        kl_k3 = sequence_kl(ev["logprobs"], ev["ref_logprobs"], mask, "k3")  # (B,)
        eos = torch.tensor([bool(a) and a[-1] == module.tokenizer.eos_id for a in rollout.answer_ids],
                           dtype=torch.float32, device=reward.device)  # (B,)
        token_mask = {"advantage_mean": mask, "return_mean": mask}
        means = global_means({"kl": kl, "kl_k3": kl_k3, "response_length": rollout.answer_lengths.float(),
                              "eos_fraction": eos,
                              "advantage_mean": advantages,  # before whitening: is the policy beating V?
                              "return_mean": returns,
                              **{f"reward_{k}": v for k, v in parts.items() if k != "reward"}}, group, token_mask)
        if self.whiten_advantages:
            advantages = global_masked_whiten(advantages, mask, group=group)
        # 6. beta follows the KL of the rollout just taken (all ranks'), counted in samples (Ziegler et al.)
        self.kl_controller.update(means["kl"], n_steps=n_rows)

        stats = {
            "reward": float(reward_mean),
            "reward_std": math.sqrt(float(reward_var)),
            "beta": beta,
            "kl_penalty": beta * means["kl"],
            "iteration": float(self.iteration),
            "time/generation_s": t1 - t0,
            "time/scoring_s": t2 - t1,
            **means,
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
