from __future__ import annotations

import os
from pathlib import Path

import pytest
import sentencepiece as spm

# OpenMP threads that busy-wait fight every other process on a 2-core machine (5x slower tests
# under load); passive waiting costs nothing when the machine is idle. Must precede importing torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from llama2_lightning.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout (or LLAMA2_LIGHTNING_SHARED_DATA); tests that need it skip without it.
SHARED_DATA = Path(os.environ.get("LLAMA2_LIGHTNING_SHARED_DATA", ROOT.parent / "shared" / "data"))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture
def llama_tokenizer_path(shared_data: Path) -> Path:
    path = shared_data / "llama2_tokenizer.model"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture
def sp(llama_tokenizer_path: Path) -> spm.SentencePieceProcessor:
    """Meta's Llama 2 tokenizer through SentencePiece itself: the independent side of a parity test."""
    return spm.SentencePieceProcessor(model_file=str(llama_tokenizer_path))


@pytest.fixture
def tok(llama_tokenizer_path: Path) -> Tokenizer:
    """Meta's Llama 2 tokenizer through this package."""
    return Tokenizer(llama_tokenizer_path)
