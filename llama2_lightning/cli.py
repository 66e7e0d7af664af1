"""The ``llama2-lightning`` command.

``fit | validate | test | predict`` go to LightningCLI (configs name the module and datamodule
classes, so every stage runs the same way); the other subcommands are small tools.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from torch.distributed.checkpoint.api import CheckpointException

from llama2_lightning.checkpoint.safe_load import CheckpointReadError, UnsafeCheckpointError
from llama2_lightning.compat_checks import CompatibilityError
from llama2_lightning.run_lock import RunDirectoryLocked

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def lightning_cli(argv: list[str] | None, run: bool = True):
    """LightningCLI over any of our modules and datamodules, with the run guards of
    :mod:`llama2_lightning.commands.fit`; ``run=False`` only instantiates (``argv`` then starts at the
    options, without the subcommand). ``argv=None`` reads ``sys.argv``."""
    # Lightning is imported only for the Lightning subcommands.
    return importlib.import_module("llama2_lightning.commands.fit").lightning_cli(argv, run)


def run_lightning(argv: list[str] | None, command: str) -> int:
    """A Lightning subcommand; the exit status says how it ended. 143 (the shell's status for
    SIGTERM): stopped by SIGTERM after saving a resumable checkpoint, what a scheduler's requeue
    logic looks for. 1: refused before training (lock held, mismatch, unsafe or unreadable checkpoint)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException  # Lightning only for its subcommands

    try:
        lightning_cli(argv)
    except SIGTERMException:
        print(f"llama2-lightning {command}: stopped by SIGTERM; a resumable checkpoint was saved "
              "(rerun with --ckpt_path <its checkpoints>/last.ckpt)", file=sys.stderr)
        return 143
    except (CompatibilityError, RunDirectoryLocked, UnsafeCheckpointError, CheckpointReadError) as err:
        print(f"llama2-lightning {command}: error: {err}", file=sys.stderr)
        return 1
    except CheckpointException as err:  # a BaseException carrying each rank's error (a sharded --ckpt_path)
        reasons = sorted({str(exc).strip().splitlines()[-1] for exc, _ in err.failures.values()})
        print(f"llama2-lightning {command}: error: cannot load the sharded checkpoint: {'; '.join(reasons)}",
              file=sys.stderr)
        return 1
    return 0


# name -> (module, function, help). Commands are imported only when run, so `--help` and `fit` do not
# pay for every command's imports.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "pipeline": ("pipeline", "cli_pipeline", "run the whole recipe (configs/pipeline/*.yaml) and write report.md"),
    "convert": ("convert", "cli_convert", "convert checkpoints between Meta, Hugging Face and Lightning formats"),
    "generate": ("generate", "cli_generate", "sample from a checkpoint"),
    "tokenizer": ("tokenizer", "cli_tokenizer", "train a SentencePiece tokenizer"),
    "chat": ("chat", "cli_chat", "talk to a checkpoint in the Llama 2-Chat format (stdin/stdout)"),
    "gatt": ("gatt", "cli_gatt", "sample Ghost Attention dialogs for SFT"),
    "distill": ("distill", "cli_distill", "safety context distillation dialogs for SFT (answers sampled with a preprompt)"),
    "evaluate": ("evaluate", "cli_evaluate", "XSTest refusals, held-out helpfulness, GAtt by turn of a model (JSON)"),
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
    """The ``llama2-lightning`` command; returns the exit status. Ctrl-C ends any command with one
    line (status 130), not a traceback."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("\nllama2-lightning: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
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
        return run_lightning(None if from_console else argv, command)
    if command not in COMMANDS:
        print(f"llama2-lightning: unknown command {command!r}; expected one of "
              f"{[*LIGHTNING_SUBCOMMANDS, *COMMANDS]}", file=sys.stderr)
        return 2
    return run_command(command, rest)


if __name__ == "__main__":
    sys.exit(main())
