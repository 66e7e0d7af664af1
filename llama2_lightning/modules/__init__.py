"""LightningModules, one per stage of the recipe."""

from llama2_lightning.modules.pretrain import PretrainModule

__all__ = ["PretrainModule"]
