"""LightningModules, one per stage of the recipe."""

from llama2_lightning.modules.pretrain import PretrainModule
from llama2_lightning.modules.reward import RewardModule
from llama2_lightning.modules.rlhf import RLHFModule
from llama2_lightning.modules.sft import SFTModule

__all__ = ["PretrainModule", "RewardModule", "RLHFModule", "SFTModule"]
