"""LightningDataModules for each stage of the Llama 2 recipe."""

from llama2_lightning.data.pretrain import PretrainDataModule

__all__ = ["PretrainDataModule"]
