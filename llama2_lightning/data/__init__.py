"""LightningDataModules for each stage of the Llama 2 recipe."""

from llama2_lightning.data.pretrain import PretrainDataModule
from llama2_lightning.data.sft import SFTDataModule

__all__ = ["PretrainDataModule", "SFTDataModule"]
