"""``fit | validate | test | predict``: LightningCLI with the guards a shared cluster needs.

Around Lightning's own subcommands this adds: the compatibility checks of
:mod:`llama2_lightning.compat_checks` before anything is read or written; an exclusive lock on the
run directory (:mod:`llama2_lightning.run_lock`) held for the whole ``fit``; removal of the
temporary files an interrupted checkpoint write left behind (only ever one writer per directory,
so none of them can still be in use); safe reading of sharded checkpoint directories
(:func:`~llama2_lightning.checkpoint.safe_load.safe_dcp_loading`, which covers ``--ckpt_path DIR``); and the
:class:`~llama2_lightning.callbacks.RunStatus` and :class:`~llama2_lightning.callbacks.TokenizerStamp`
callbacks on every trainer, whatever the config lists.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError, set_parsing_settings
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from llama2_lightning.callbacks.run_status import RunStatus
from llama2_lightning.callbacks.tokenizer_stamp import TokenizerStamp
from llama2_lightning.checkpoint.safe_load import safe_dcp_loading
from llama2_lightning.commands.callback_overrides import apply_callback_overrides, split_callback_overrides
from llama2_lightning.compat_checks import check_fit_start
from llama2_lightning.run_lock import RunLock

# What AtomicCheckpointIO writes before its rename: `.<name>.ckpt.<random>.tmp`.
_CHECKPOINT_TEMPORARY = re.compile(r"\..+\.ckpt\..+\.tmp")
_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")


def _launcher_rank_zero(trainer: Trainer) -> bool:
    """True in the one process per job that owns the run directory: ranks a launcher started (they
    see LOCAL_RANK / NODE_RANK, or SLURM's ids, through the cluster environment) share its lock."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    return env is None or (env.local_rank() == 0 and env.node_rank() == 0)


def remove_checkpoint_temporaries(trainer: Trainer) -> list[Path]:
    """Delete the half-written ``.*.ckpt.*.tmp`` files of an earlier, interrupted run (each as big as
    a checkpoint) from this run's checkpoint directories; call it while holding the run lock."""
    dirs = {Path(trainer.default_root_dir) / "checkpoints"}
    dirs |= {Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)}
    removed = [p for d in sorted(dirs) if d.is_dir() for p in sorted(d.iterdir())
               if p.is_file() and _CHECKPOINT_TEMPORARY.fullmatch(p.name)]
    for path in removed:
        path.unlink(missing_ok=True)
    if removed:
        rank_zero_info(f"removed {len(removed)} temporary file(s) left by an interrupted checkpoint write: "
                       + ", ".join(str(p) for p in removed))
    return removed


class LlamaLightningCLI(LightningCLI):
    """LightningCLI over every module and datamodule (``class_path`` in the config), guarded (module docstring).
    ``callback_overrides``: what :func:`~llama2_lightning.commands.callback_overrides.split_callback_overrides`
    took out of the command line, set in the parsed callbacks before they are built."""

    def __init__(self, *args: Any, callback_overrides: Sequence[tuple[str, str, Any]] = (), **kwargs: Any) -> None:
        self._callback_overrides = list(callback_overrides)
        super().__init__(*args, **kwargs)

    def before_instantiate_classes(self) -> None:
        if self._callback_overrides:
            config = self.config.get(str(self.subcommand)) if self.subcommand else self.config
            apply_callback_overrides(config.trainer.callbacks, self._callback_overrides)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--allow_tokenizer_change", type=bool, default=False,
                            help="start from or resume a checkpoint recorded with another tokenizer "
                                 "(its token ids change meaning)")

    def _setting(self, key: str) -> Any:
        config = self.config.get(str(self.subcommand), self.config)
        return config.get(key)

    def _warn_fractional_one(self) -> None:
        trainer_config = self._setting("trainer") or {}
        for key in _LIMITS:
            value = trainer_config.get(key)
            if isinstance(value, float) and value == 1.0:
                rank_zero_warn(f"trainer.{key}: 1.0 is a fraction: 100% of the batches. Write 1 (an integer) for "
                               "one batch, or leave it unset for all of them")

    def fit(self, model: LightningModule, datamodule: LightningDataModule | None = None, **kwargs: Any) -> None:
        check_fit_start(model, datamodule, kwargs.get("ckpt_path"), bool(self._setting("allow_tokenizer_change")))
        self._warn_fractional_one()
        lock = RunLock(self.trainer.default_root_dir) if _launcher_rank_zero(self.trainer) else None
        with lock if lock is not None else contextlib.nullcontext(), safe_dcp_loading():
            if lock is not None:
                remove_checkpoint_temporaries(self.trainer)
            self.trainer.fit(model, datamodule=datamodule, **kwargs)

    def validate(self, **kwargs: Any) -> Any:
        with safe_dcp_loading():
            return self.trainer.validate(**kwargs)

    def test(self, **kwargs: Any) -> Any:
        with safe_dcp_loading():
            return self.trainer.test(**kwargs)

    def predict(self, **kwargs: Any) -> Any:
        with safe_dcp_loading():
            return self.trainer.predict(**kwargs)


def lightning_cli(argv: list[str] | None, run: bool = True) -> LlamaLightningCLI:
    """The CLI over any of our modules and datamodules; ``run=False`` only instantiates (``argv``
    then starts at the options, without the subcommand). ``argv=None`` reads ``sys.argv``."""
    # wandb never reaches the network unless the user asks for it with WANDB_MODE=online.
    os.environ.setdefault("WANDB_MODE", "offline")
    from_console = argv is None
    argv, overrides = split_callback_overrides(sys.argv[1:] if from_console else argv)
    if from_console:
        # LightningCLI reads sys.argv itself (given both, it warns about a mistake): hand it the rest.
        sys.argv[1:] = argv
    # Configs write `${trainer.default_root_dir}` from their own root; omegaconf+ resolves it after
    # command-line overrides, so `--trainer.default_root_dir X` moves checkpoints and logs together.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    return LlamaLightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf+"},  # ${...} resolved after command-line overrides
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [RunStatus(), TokenizerStamp()]},
        callback_overrides=overrides,
        args=None if from_console else argv,
        run=run,
    )


class _ParseOnlyCLI(LlamaLightningCLI):
    def instantiate_classes(self) -> None:
        """Parsing has checked every key against the signatures of the classes it names; build nothing."""


def check_fit_config(config_path: str | os.PathLike[str]) -> None:
    """Parse a ``fit`` config the way ``fit --config`` does, without building or running anything:
    an unknown or mistyped key anywhere (a callback's ``init_args`` included) raises ``ValueError``."""
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    try:
        _ParseOnlyCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                      parser_kwargs={"parser_mode": "omegaconf+", "exit_on_error": False},
                      save_config_callback=None, args=["--config", str(config_path)], run=False)
    except ArgumentError as err:
        raise ValueError(f"{config_path}: {err}") from None
