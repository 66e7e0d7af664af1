"""Fixtures the stage modules' tests share: the shipped tokenizer and a random tiny stage checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from paths import TOKENIZER

from llama2_lightning import Transformer
from llama2_lightning.checkpoint import save_hf
from llama2_lightning.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """Here the shipped 2,048-piece tokenizer (the tiny models' vocabulary), not Meta's."""
    return Tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random ``tiny`` model saved the way the stages' checkpoints store it (``model.*`` + ``llama_config``):
    a base model for SFT, an SFT policy for RLHF."""
    torch.manual_seed(0)
    model = Transformer.from_name("tiny")
    path = tmp_path_factory.mktemp("stage") / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "llama_config": model.config.to_dict()}, path)
    return path


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny language model in Hugging Face format: the stand-in for an SFT checkpoint."""
    torch.manual_seed(0)
    model = Transformer.from_name("tiny")
    path = tmp_path_factory.mktemp("init") / "hf"
    save_hf(model.config, model.state_dict(), path)
    return path
