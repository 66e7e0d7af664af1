"""``llama2-lightning tokenizer``: train a SentencePiece tokenizer on text files."""

from __future__ import annotations

import argparse
import sys

from llama2_lightning.tokenizer_training import train_tokenizer


def cli_tokenizer(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llama2-lightning tokenizer", description="SentencePiece tokenizer tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a Llama 2 style SentencePiece BPE tokenizer")
    train.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="FILE_OR_GLOB",
        help="text file (one sentence per line) or .jsonl with a 'text' field; repeatable",
    )
    train.add_argument("--output", required=True, help="where to write the .model file")
    train.add_argument("--vocab-size", type=int, default=2048)
    args = parser.parse_args(argv)

    try:
        tokenizer = train_tokenizer(args.input, args.output, vocab_size=args.vocab_size)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {tokenizer.model_path} (vocab size {tokenizer.vocab_size})")
    return 0
