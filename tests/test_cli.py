"""The llama2-lightning command: dispatch, config errors, generate, wandb offline by default."""

from __future__ import annotations

import glob
import json
import time
from pathlib import Path

import pytest
import torch

from paths import ROOT

from llama2_lightning import Transformer
from llama2_lightning.checkpoint import save_hf
from llama2_lightning.cli import lightning_cli, main

TINY = str(ROOT / "configs" / "pretrain" / "tiny.yaml")


def test_unknown_command_and_help(capsys) -> None:
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("fit", "convert", "generate", "tokenizer"))


def test_typo_in_config_key_names_the_key(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", TINY, "--model.init_args.warmup_stepz=3"])
    assert exc.value.code != 0
    assert "warmup_stepz" in capsys.readouterr().err


def test_print_config_resolves_interpolation(capsys, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", TINY, f"--trainer.default_root_dir={tmp_path}", "--print_config"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"dirpath: {tmp_path}/checkpoints" in out and "${" not in out


def test_generate_command_from_hf_directory(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    model = Transformer.from_name("tiny")
    save_hf(model.config, model.state_dict(), tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.model").write_bytes((ROOT / "data" / "tokenizer.model").read_bytes())
    args = ["generate", "--checkpoint", str(tmp_path / "hf"), "--prompt", "ROMEO:", "--max-new-tokens", "8",
            "--temperature", "0"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("ROMEO:") and len(first.splitlines()[0]) > len("ROMEO:")
    assert main(args) == 0
    assert capsys.readouterr().out == first  # greedy: deterministic


def test_wandb_runs_offline_by_default(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cli = lightning_cli(["fit", "--config", TINY, "--model.init_args.model=tiny", "--data.init_args.max_seq_len=32",
                         "--data.init_args.batch_size=4", f"--data.init_args.cache_dir={tmp_path / 'cache'}",
                         f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=3",
                         "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=1",
                         "--trainer.val_check_interval=3", "--trainer.enable_progress_bar=false"])
    import os

    import wandb

    assert os.environ["WANDB_MODE"] == "offline"
    run_dir = Path(cli.trainer.logger.experiment.dir).parent
    wandb.finish()
    assert run_dir.name.startswith("offline-run-") and run_dir.is_relative_to(tmp_path)
    [history] = glob.glob(str(run_dir / "*.wandb"))  # the offline run's records (protobuf)
    deadline = time.monotonic() + 60
    while b"val/loss" not in (raw := Path(history).read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.5)  # wandb's service process may still be flushing under load
    assert b"train/loss" in raw and b"val/loss" in raw and b"train/tokens_per_sec" in raw
    [table] = glob.glob(str(run_dir / "files" / "media" / "table" / "samples_*.table.json"))
    assert "ROMEO" in json.loads(Path(table).read_text())["data"][0][1]
