"""Setting a configured callback's argument from the fit command line (commands/callback_overrides.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from paths import ROOT

from llama2_lightning.cli import lightning_cli
from llama2_lightning.commands.callback_overrides import split_callback_overrides

CONFIG = str(ROOT / "configs" / "pretrain" / "tiny.yaml")


def test_split_reads_both_spellings_and_yaml_values() -> None:
    rest, overrides = split_callback_overrides(
        ["fit", "--config", "c.yaml", "--trainer.callbacks.ModelCheckpoint.init_args.save_top_k=3",
         "--trainer.callbacks.LearningRateMonitor.init_args.logging_interval", "epoch",
         "--trainer.callbacks.window_size=5"])
    assert rest == ["fit", "--config", "c.yaml", "--trainer.callbacks.window_size=5"]  # jsonargparse's own form stays
    assert overrides == [("ModelCheckpoint", "save_top_k", 3), ("LearningRateMonitor", "logging_interval", "epoch")]


def test_a_callback_that_is_not_last_gets_its_argument(tmp_path: Path) -> None:
    cli = lightning_cli(["--config", CONFIG, f"--trainer.default_root_dir={tmp_path}",
                         "--trainer.callbacks.ModelCheckpoint.init_args.every_n_train_steps=7",
                         "--trainer.callbacks.LearningRateMonitor.init_args.logging_interval=epoch"], run=False)
    [ckpt] = [cb for cb in cli.trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    [lr] = [cb for cb in cli.trainer.callbacks if isinstance(cb, LearningRateMonitor)]
    assert ckpt._every_n_train_steps == 7  # the config says 100
    assert lr.logging_interval == "epoch"  # the config says step


def test_unknown_class_or_argument_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"0 configured callbacks are named 'PPOCallback'.*ModelCheckpoint"):
        lightning_cli(["--config", CONFIG, f"--trainer.default_root_dir={tmp_path}",
                       "--trainer.callbacks.PPOCallback.init_args.kl_coef=0.1"], run=False)
    with pytest.raises(ValueError, match=r"ModelCheckpoint has no argument 'every_n_step'.*every_n_train_steps"):
        lightning_cli(["--config", CONFIG, f"--trainer.default_root_dir={tmp_path}",
                       "--trainer.callbacks.ModelCheckpoint.init_args.every_n_step=7"], run=False)
