"""The ``llama2-lightning`` command.

``fit | validate | test | predict`` go to LightningCLI (configs name the module and datamodule
classes, so every stage runs the same way); the other subcommands are small tools.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def lightning_cli(argv: list[str] | None, run: bool = True):
    """LightningCLI over any of our modules and datamodules; ``run=False`` only instantiates
    (``argv`` then starts at the options, without the subcommand). ``argv=None`` reads ``sys.argv``."""
    # wandb never reaches the network unless the user asks for it with WANDB_MODE=online.
    os.environ.setdefault("WANDB_MODE", "offline")
    from jsonargparse import set_parsing_settings
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    # Configs write `${trainer.default_root_dir}` from their own root; omegaconf+ resolves it after
    # command-line overrides, so `--trainer.default_root_dir X` moves checkpoints and logs together.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)

    return LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf+"},  # ${...} resolved after command-line overrides
        save_config_kwargs={"overwrite": True},
        args=argv,
        run=run,
    )


# name -> (module, function, help). Commands are imported only when run, so `--help` and `fit` do not
# pay for every command's imports.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "pipeline": ("pipeline", "cli_pipeline", "run the whole recipe (configs/pipeline/*.yaml) and write report.md"),
    "convert": ("convert", "cli_convert", "convert checkpoints between Meta, Hugging Face and Lightning formats"),
    "generate": ("generate", "cli_generate", "sample from a checkpoint"),
    "tokenizer": ("tokenizer", "cli_tokenizer", "train a SentencePiece tokenizer"),
    "chat": ("chat", "cli_chat", "talk to a checkpoint in the Llama 2-Chat format (stdin/stdout)"),
    "gatt": ("gatt", "cli_gatt", "sample Ghost Attention dialogs for SFT"),
    "score-pairs": ("score", "cli_score_pairs", "reward-model accuracy on preference files (JSON summary last)"),
    "score": ("score", "cli_score", "reward-model scores of answers to a prompt"),
    "export-rm": ("score", "cli_export_rm", "reward-model checkpoint to Hugging Face LlamaForSequenceClassification"),
    "memory": ("memory", "cli_memory", "per-GPU memory of a config over N simulated ranks (JSON summary last)"),
}


def run_command(name: str, argv: list[str]) -> int:
    module, function, _ = COMMANDS[name]
    command: Callable[[list[str]], int | None] = getattr(importlib.import_module(f"llama2_lightning.commands.{module}"), function)
    return command(argv) or 0


def main(argv: list[str] | None = None) -> int:
    from_console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        lines = ["usage: llama2-lightning {%s} ..." % ",".join([*LIGHTNING_SUBCOMMANDS, *COMMANDS]), ""]
        lines += [f"  {c:<10} LightningCLI {c} (--config FILE)" for c in LIGHTNING_SUBCOMMANDS]
        lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
        print("\n".join(lines))
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in LIGHTNING_SUBCOMMANDS:
        # From the console, LightningCLI reads sys.argv itself (given both, it warns about a mistake).
        lightning_cli(None if from_console else argv)
        return 0
    if command not in COMMANDS:
        print(f"llama2-lightning: unknown command {command!r}; expected one of "
              f"{[*LIGHTNING_SUBCOMMANDS, *COMMANDS]}", file=sys.stderr)
        return 2
    return run_command(command, rest)


if __name__ == "__main__":
    sys.exit(main())
