"""Command-line edges: sampling options out of range are usage errors naming the option (not torch
errors mid-sampling), `chat` with stdin closed says so, `chat` keeps the conversation when it
refuses a message, `pipeline --dry-run` checks every leaf key, a fractional `1.0` limit warns, and
Ctrl-C ends a command with one line."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from llama2_lightning.checkpoint import save_checkpoint
from llama2_lightning.cli import main
from llama2_lightning.config import LlamaConfig
from llama2_lightning.model import Transformer

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
TOKENIZER = str(ROOT / "data" / "tokenizer.model")
from fit_configs import tiny_fit_config, write_config


@pytest.mark.parametrize("option, value", [("--top-k", "0"), ("--top-k", "-3"), ("--max-new-tokens", "-5"),
                                           ("--temperature", "nan"), ("--temperature", "-1"), ("--top-p", "0")])
def test_generate_rejects_sampling_options_out_of_range(option: str, value: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--preset", "tiny", "--tokenizer", TOKENIZER, "--prompt", "hi", option, value])
    assert exit_.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = LlamaConfig.from_name("tiny", max_seq_len=64)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-hf")
    save_checkpoint(config, Transformer(config).state_dict(), path, "hf")
    return path


def test_chat_with_stdin_closed(hf_tiny: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", None)  # what Python gives a process started with `0<&-`
    rc = main(["chat", "--checkpoint", str(hf_tiny), "--tokenizer", TOKENIZER, "--device", "cpu"])
    assert rc == 1 and "standard input is closed" in capsys.readouterr().err


def test_chat_keeps_the_history_when_it_refuses_a_message(hf_tiny: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import llama2_lightning.commands.chat as chat_module
    from llama2_lightning.tokenizer import Tokenizer

    prompts: list[list[int]] = []

    def answer(model: Any, tokenizer: Any, batch: list[list[int]], *args: Any, **kwargs: Any) -> list[str]:
        prompts.extend(batch)
        return ["Fine."]

    monkeypatch.setattr(chat_module, "sample_answers", answer)
    too_long = " ".join(["word"] * 200)  # far beyond the 64-token context
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"Remember the number seven.\n{too_long}\nWhich number?\n"))
    rc = main(["chat", "--checkpoint", str(hf_tiny), "--tokenizer", TOKENIZER, "--device", "cpu",
               "--max-new-tokens", "4"])
    assert rc == 0
    assert "write a shorter one" in capsys.readouterr().err
    assert len(prompts) == 2  # the long message was refused, not answered
    assert "seven" in Tokenizer(TOKENIZER).decode(prompts[1])  # and the first exchange is still there


def test_ctrl_c_prints_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import llama2_lightning.cli as cli

    def interrupted(name: str, argv: list[str]) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_command", interrupted)
    assert main(["convert"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "llama2-lightning: interrupted" and "Traceback" not in err


def test_pipeline_dry_run_checks_every_leaf_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stage = write_config(tmp_path / "stage.yaml", tiny_fit_config(tmp_path / "unused"))
    pipeline = tmp_path / "pipeline.yaml"
    raw = {"run_dir": str(tmp_path / "run"), "stages": [
        {"name": "good", "config": str(stage)},
        {"name": "typo", "config": str(stage),
         "set": {"trainer.callbacks.ModelCheckpoint.init_args.every_n_stepz": 2}}]}
    pipeline.write_text(yaml.safe_dump(raw))
    assert main(["pipeline", "--config", str(pipeline), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "stage 'typo'" in err and "every_n_stepz" in err and "stage 'good'" not in err
    raw["stages"].pop()
    pipeline.write_text(yaml.safe_dump(raw))
    assert main(["pipeline", "--config", str(pipeline), "--dry-run"]) == 0
    assert not (tmp_path / "run").exists()  # nothing ran


def test_integer_limits_stay_integers_and_a_fractional_one_warns(tmp_path: Path) -> None:
    from llama2_lightning.commands.fit import LlamaLightningCLI, lightning_cli

    config = tiny_fit_config(tmp_path / "run")
    config["trainer"]["limit_val_batches"] = 1
    cli = lightning_cli(["--config", str(write_config(tmp_path / "fit.yaml", config))], run=False)
    assert cli.trainer.limit_val_batches == 1 and isinstance(cli.trainer.limit_val_batches, int)
    probe = LlamaLightningCLI.__new__(LlamaLightningCLI)
    probe.subcommand, probe.config = None, {"trainer": {"limit_val_batches": 1.0, "limit_train_batches": 1}}
    with pytest.warns(UserWarning, match=r"trainer.limit_val_batches: 1\.0 is a fraction: 100% of the batches"):
        probe._warn_fractional_one()
