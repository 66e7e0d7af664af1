"""LightningDataModules for each stage of the Llama 2 recipe."""

from llama2_lightning.data.preference import PreferenceDataModule
from llama2_lightning.data.pretrain import PretrainDataModule
from llama2_lightning.data.prompts import PromptDataModule
from llama2_lightning.data.sft import SFTDataModule

__all__ = ["PreferenceDataModule", "PretrainDataModule", "PromptDataModule", "SFTDataModule"]
