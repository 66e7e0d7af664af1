"""Pure RLHF math for Llama 2 (arXiv 2307.09288, sections 3.2.2-3.2.3): masking statistics, KL
estimators and controllers, GAE, PPO losses, the safety-gated reward and the margin ranking loss."""

from llama2_lightning.rlhf.advantages import gae
from llama2_lightning.rlhf.kl import kl_penalty
from llama2_lightning.rlhf.kl_control import AdaptiveKLController, FixedKLController
from llama2_lightning.rlhf.masking import check_contiguous, last_true_index, masked_mean, masked_var, masked_whiten
from llama2_lightning.rlhf.ppo import entropy_from_logits, ppo_policy_loss, ppo_value_loss
from llama2_lightning.rlhf.ranking import MARGINS, margin_for, ranking_loss
from llama2_lightning.rlhf.reward_shaping import (
    SAFETY_THRESHOLD, combine_rewards, llama2_reward, logit, per_token_rewards, whiten_rewards,
)

__all__ = [
    "MARGINS",
    "SAFETY_THRESHOLD",
    "AdaptiveKLController",
    "FixedKLController",
    "check_contiguous",
    "combine_rewards",
    "entropy_from_logits",
    "gae",
    "kl_penalty",
    "last_true_index",
    "llama2_reward",
    "logit",
    "margin_for",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "per_token_rewards",
    "ppo_policy_loss",
    "ppo_value_loss",
    "ranking_loss",
    "whiten_rewards",
]
