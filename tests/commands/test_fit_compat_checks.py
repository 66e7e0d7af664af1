"""Mismatches between the model, the data and the starting checkpoint are refused before `fit`
builds anything, with the numbers and the key to change, instead of an IndexError deep in torch
(embedding lookup, RoPE table) or, for another tokenizer, silently wrong training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llama2_lightning.compat_checks import CompatibilityError, check_fit_start
from llama2_lightning.config import LlamaConfig
from llama2_lightning.data import PreferenceDataModule, PretrainDataModule
from llama2_lightning.modules import PretrainModule, RewardModule
from llama2_lightning.tokenizer import Tokenizer

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
TOKENIZER = str(ROOT / "data" / "tokenizer.model")  # 2,048 pieces
from fit_configs import tiny_fit_config, write_config


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from llama2_lightning.cli import main

    rc = main(argv)
    return rc, capsys.readouterr().err


def test_fit_refuses_a_vocab_smaller_than_the_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tiny_fit_config(tmp_path / "run")
    config["model"]["init_args"]["model_overrides"]["vocab_size"] = 1000
    rc, err = _main(["fit", "--config", str(write_config(tmp_path / "fit.yaml", config))], capsys)
    assert rc == 1
    assert "vocab_size is 1000 but the data's tokenizer" in err and "2048 pieces" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_fit_refuses_data_longer_than_the_models_context(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tiny_fit_config(tmp_path / "run")
    config["data"]["init_args"]["max_seq_len"] = 64  # the model's is 32
    rc, err = _main(["fit", "--config", str(write_config(tmp_path / "fit.yaml", config))], capsys)
    assert rc == 1 and "data max_seq_len=64 exceeds the PretrainModule model's max_seq_len=32" in err


def test_reward_model_vocab_check() -> None:
    module = RewardModule(model="tiny", model_overrides={"vocab_size": 512})
    data = PreferenceDataModule([{"path": "unused.jsonl", "format": "pairs"}], tokenizer_path=TOKENIZER,
                                max_seq_len=128)
    with pytest.raises(CompatibilityError, match="RewardModule model: vocab_size is 512"):
        check_fit_start(module, data, None)


def _stamped_checkpoint(path: Path, tokenizer_sha256: str) -> Path:
    config = LlamaConfig.from_name("tiny")
    torch.save({"state_dict": {}, "llama_config": config.to_dict(), "tokenizer_sha256": tokenizer_sha256}, path)
    return path


def test_a_checkpoint_trained_with_another_tokenizer_is_refused_unless_allowed(tmp_path: Path) -> None:
    data = PretrainDataModule(tokenizer_path=TOKENIZER, max_seq_len=32)
    other = _stamped_checkpoint(tmp_path / "other.ckpt", "0" * 64)
    module = PretrainModule(model="tiny", init_from=str(other))
    with pytest.raises(CompatibilityError, match=r"init_from .*other\.ckpt was trained with a different tokenizer"):
        check_fit_start(module, data, None)
    with pytest.raises(CompatibilityError, match=r"ckpt_path .*other\.ckpt was trained with a different tokenizer"):
        check_fit_start(PretrainModule(model="tiny"), data, str(other))
    check_fit_start(module, data, None, allow_tokenizer_change=True)  # the explicit override
    same = _stamped_checkpoint(tmp_path / "same.ckpt", Tokenizer(TOKENIZER).content_hash)
    check_fit_start(PretrainModule(model="tiny", init_from=str(same)), data, str(same))
