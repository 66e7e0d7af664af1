"""The argument checks and the lazy tokenizer every data module shares (llama2_lightning.data.base)."""

from __future__ import annotations

from pathlib import Path

import pytest

from paths import TOKENIZER

from llama2_lightning.data.base import check_choice, check_ints, check_val_fraction
from llama2_lightning.data.preference import PreferenceDataModule
from llama2_lightning.data.pretrain import PretrainDataModule
from llama2_lightning.data.prompts import PromptDataModule
from llama2_lightning.data.sft import SFTDataModule


@pytest.mark.parametrize("value", [True, 2.0, "3", None, 0])
def test_check_ints_names_the_argument_and_the_bound(value: object) -> None:
    with pytest.raises(ValueError, match=rf"batch_size must be an integer >= 1, got {value!r}"):
        check_ints(("max_seq_len", 8, 8), ("batch_size", value, 1))
    check_ints(("max_seq_len", 8, 8), ("batch_size", 1, 1))  # at the bound: accepted


def test_check_val_fraction_and_choice() -> None:
    check_val_fraction(0.0, allow_zero=True)
    with pytest.raises(ValueError, match=r"open interval \(0, 1\), got 0.0"):
        check_val_fraction(0.0, allow_zero=False)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
            check_val_fraction(bad, allow_zero=True)
    with pytest.raises(ValueError, match="truncation must be 'drop' or 'left', got 'right'"):
        check_choice("truncation", "right", ("drop", "left"))


def test_every_data_module_loads_its_tokenizer_once_on_first_use(tmp_path: Path) -> None:
    missing = str(tmp_path / "absent.model")
    modules = [
        PretrainDataModule(train_files=[str(tmp_path / "a.txt")], tokenizer_path=missing),
        SFTDataModule(tokenizer_path=missing),
        PreferenceDataModule(sources=[{"path": "x.jsonl"}], tokenizer_path=missing),
        PromptDataModule(tokenizer_path=missing),
    ]
    for dm in modules:  # built from arguments alone: no file read yet
        with pytest.raises((FileNotFoundError, OSError, ValueError)):
            dm.tokenizer  # noqa: B018 -- the property reads the file
        dm.tokenizer_path = str(TOKENIZER)
        assert dm.tokenizer is dm.tokenizer and dm.vocab_size == dm.tokenizer.vocab_size > 0


def test_use_tokenizer_takes_a_loaded_tokenizer_of_the_same_file_only(tmp_path: Path) -> None:
    from llama2_lightning.tokenizer import Tokenizer

    import os
    import re

    loaded = Tokenizer(TOKENIZER)
    # the same file named two other ways: the directory holding it, and a path relative to the working directory
    for same in (str(TOKENIZER.parent), os.path.relpath(TOKENIZER)):
        dm = PromptDataModule(tokenizer_path=same)
        dm.use_tokenizer(loaded)
        assert dm.tokenizer is loaded  # not read again
    other = tmp_path / "other.model"
    other.write_bytes(TOKENIZER.read_bytes())
    with pytest.raises(ValueError, match=re.escape(f"loaded from {TOKENIZER}, but tokenizer_path is {other}")):
        PromptDataModule(tokenizer_path=str(other)).use_tokenizer(loaded)
