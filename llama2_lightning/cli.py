"""The ``llama2-lightning`` command.

``fit | validate | test | predict`` go to LightningCLI (configs name the module and datamodule
classes, so every stage runs the same way); the other subcommands are small tools.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def lightning_cli(argv: list[str] | None, run: bool = True):
    """LightningCLI over any of our modules and datamodules; ``run=False`` only instantiates
    (``argv`` then starts at the options, without the subcommand). ``argv=None`` reads ``sys.argv``."""
    import os

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


def cli_generate(argv: list[str] | None = None) -> int:
    import torch

    from llama2_lightning.checkpoint import load_model
    from llama2_lightning.generation import generate
    from llama2_lightning.model import Transformer
    from llama2_lightning.tokenizer import Tokenizer

    parser = argparse.ArgumentParser(prog="llama2-lightning generate", description="Sample a continuation.")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="HF or Meta directory (with tokenizer.model) or a Lightning .ckpt")
    src.add_argument("--preset", help="random weights of a named preset, e.g. tiny (a smoke test of the stack)")
    parser.add_argument("--tokenizer", help="tokenizer.model (default: the one inside --checkpoint)")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from pathlib import Path

    tok_path = args.tokenizer
    if tok_path is None:
        base = Path(args.checkpoint) if args.checkpoint else None
        candidates = [base / "tokenizer.model", base.parent / "tokenizer.model"] if base else []
        tok_path = next((c for c in candidates if c.is_file()), None)
        if tok_path is None:
            parser.error("no tokenizer.model beside --checkpoint: pass --tokenizer PATH")
    tokenizer = Tokenizer(tok_path)
    if args.checkpoint:
        model = load_model(args.checkpoint)
    else:
        torch.manual_seed(args.seed)
        model = Transformer.from_name(args.preset, vocab_size=tokenizer.vocab_size)
    if model.config.vocab_size < tokenizer.vocab_size:
        parser.error(f"model vocab_size {model.config.vocab_size} < tokenizer's {tokenizer.vocab_size}")
    prompts = [tokenizer.encode(p, bos=True) for p in args.prompt]
    out = generate(model, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, seed=args.seed)
    for prompt, new in zip(args.prompt, out.as_lists()):
        print(prompt + tokenizer.decode([t for t in new if t != tokenizer.eos_id]))
        print("-" * 40)
    return 0


def _tools() -> dict[str, tuple[Callable[[list[str]], int], str]]:
    def convert(argv: list[str]) -> int:
        from llama2_lightning.checkpoint import cli_convert

        return cli_convert(argv)

    def tokenizer(argv: list[str]) -> int:
        from llama2_lightning.tokenizer import cli_tokenizer

        return cli_tokenizer(argv)

    def chat(argv: list[str]) -> int:
        from llama2_lightning.gatt import cli_chat

        return cli_chat(argv)

    def gatt(argv: list[str]) -> int:
        from llama2_lightning.gatt import cli_gatt

        return cli_gatt(argv)

    def score_pairs(argv: list[str]) -> int:
        from llama2_lightning.scoring import cli_score_pairs

        return cli_score_pairs(argv)

    def score(argv: list[str]) -> int:
        from llama2_lightning.scoring import cli_score

        return cli_score(argv)

    def export_rm(argv: list[str]) -> int:
        from llama2_lightning.scoring import cli_export_rm

        return cli_export_rm(argv)

    def pipeline(argv: list[str]) -> int:
        from llama2_lightning.pipeline import cli_pipeline

        return cli_pipeline(argv)

    return {
        "pipeline": (pipeline, "run the whole recipe (configs/pipeline/*.yaml) and write report.md"),
        "convert": (convert, "convert checkpoints between Meta, Hugging Face and Lightning formats"),
        "generate": (cli_generate, "sample from a checkpoint"),
        "tokenizer": (tokenizer, "train a SentencePiece tokenizer"),
        "chat": (chat, "talk to a checkpoint in the Llama 2-Chat format (stdin/stdout)"),
        "gatt": (gatt, "sample Ghost Attention dialogs for SFT"),
        "score-pairs": (score_pairs, "reward-model accuracy on preference files (JSON summary last)"),
        "score": (score, "reward-model scores of answers to a prompt"),
        "export-rm": (export_rm, "reward-model checkpoint to Hugging Face LlamaForSequenceClassification"),
    }


def main(argv: list[str] | None = None) -> int:
    from_console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    tools = _tools()
    if not argv or argv[0] in ("-h", "--help"):
        lines = ["usage: llama2-lightning {%s} ..." % ",".join([*LIGHTNING_SUBCOMMANDS, *tools]), ""]
        lines += [f"  {c:<10} LightningCLI {c} (--config FILE)" for c in LIGHTNING_SUBCOMMANDS]
        lines += [f"  {name:<10} {help_}" for name, (_, help_) in tools.items()]
        print("\n".join(lines))
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in LIGHTNING_SUBCOMMANDS:
        # From the console, LightningCLI reads sys.argv itself (given both, it warns about a mistake).
        lightning_cli(None if from_console else argv)
        return 0
    if command not in tools:
        print(f"llama2-lightning: unknown command {command!r}; expected one of "
              f"{[*LIGHTNING_SUBCOMMANDS, *tools]}", file=sys.stderr)
        return 2
    return tools[command][0](rest) or 0


if __name__ == "__main__":
    sys.exit(main())
