"""Reward-model commands (``llama2-lightning <command> --help``).

* ``score-pairs --checkpoint RM FILE...``: pairwise accuracy on JSONL preference files ("pairs" or
  HH-RLHF format, plain or gzip); progress on stderr, one JSON object as the last stdout line.
* ``score --checkpoint RM --prompt TEXT --answer TEXT [--answer TEXT ...]``: one JSON line per answer.
* ``export-rm CKPT DST``: a RewardModule checkpoint to a Hugging Face sequence-classification directory.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from llama2_lightning.config import LlamaConfig
from llama2_lightning.data.preference import PreferenceDataModule, PreferenceDataset, SourceStats
from llama2_lightning.dtypes import DTYPES
from llama2_lightning.jsonl import read_jsonl
from llama2_lightning.reward_models import export_reward_model, find_tokenizer, load_reward_model_info, score
from llama2_lightning.scalar_model import ScalarModel
from llama2_lightning.tokenizer import Tokenizer


# ---------------------------------------------------------------------------------------------- commands
def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="RewardModule .ckpt (or sharded checkpoint directory) or an export-rm directory")
    parser.add_argument("--tokenizer", help="tokenizer.model (default: the one the checkpoint records or holds)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: as stored)")


def _load_for_cli(args: argparse.Namespace, parser: argparse.ArgumentParser
                  ) -> tuple[ScalarModel, LlamaConfig, Tokenizer]:
    try:
        model, config, info = load_reward_model_info(args.checkpoint, args.device, DTYPES[args.dtype] if args.dtype else None)
    except (ValueError, FileNotFoundError, pickle.UnpicklingError) as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    tok_path = Path(args.tokenizer) if args.tokenizer else find_tokenizer(Path(args.checkpoint), info)
    if tok_path is None:
        parser.error(f"no tokenizer recorded with or found beside {args.checkpoint}: pass --tokenizer PATH")
    tokenizer = Tokenizer(tok_path)
    if tokenizer.vocab_size > config.vocab_size:
        parser.error(f"tokenizer {tok_path} has {tokenizer.vocab_size} pieces but the model only "
                     f"{config.vocab_size} embeddings: wrong --tokenizer?")
    return model, config, tokenizer


def _sniff_format(path: Path) -> str:
    """"pairs" when the first record has ``prompt``/``messages``, else "hh" (two whole dialogs)."""
    for _, record in read_jsonl(path):
        return "pairs" if ("prompt" in record or "messages" in record) else "hh"
    raise ValueError(f"{path}: no records")


def cli_score_pairs(argv: list[str] | None = None) -> int:
    """``llama2-lightning score-pairs``: pairwise accuracy of a reward model on preference files."""
    parser = argparse.ArgumentParser(
        prog="llama2-lightning score-pairs",
        description="Score both sides of each preference pair; print progress to stderr and, as the last "
                    'stdout line, {"pairs": n, "accuracy": a, "mean_margin": m} (m = mean r_chosen - r_rejected).',
    )
    _add_model_args(parser)
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="JSONL preference files (plain or .gz)")
    parser.add_argument("--format", choices=("auto", "pairs", "hh"), default="auto",
                        help='"pairs" ({prompt|messages, chosen, rejected}), "hh" (HH-RLHF dialogs), or sniffed')
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="longest sequence (default: the model's); longer pairs lose their oldest turns")
    parser.add_argument("--on-bad-line", choices=("error", "skip"), default="error")
    args = parser.parse_args(argv)
    model, config, tokenizer = _load_for_cli(args, parser)
    max_seq_len = min(args.max_seq_len or config.max_seq_len, config.max_seq_len)

    try:
        formats = [args.format if args.format != "auto" else _sniff_format(f) for f in args.files]
        # The training data module's reader: same parsing, chat encoding, truncation and drop rules.
        dm = PreferenceDataModule(
            sources=[{"path": str(f), "format": fmt} for f, fmt in zip(args.files, formats)],
            tokenizer_path=str(tokenizer.model_path),
            max_seq_len=max_seq_len, batch_size=args.batch_size, val_fraction=0.5, on_bad_line=args.on_bad_line,
        )
        dm.use_tokenizer(tokenizer)  # already loaded and checked against the model
        pairs = []
        for i, spec in enumerate(dm.sources):
            stats = SourceStats(spec.name, str(spec.path), spec.format, "val")
            pairs += dm._read_source(spec, i, stats)
            print(f"{spec.path} [{spec.format}]: {stats.records} records, {stats.pairs} pairs scored "
                  f"({stats.identical} identical, {stats.too_long} too long for {max_seq_len} tokens, "
                  f"{stats.bad_lines} bad lines dropped; {stats.truncated} truncated)", file=sys.stderr)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    if not pairs:
        parser.exit(1, f"{parser.prog}: error: no pairs to score in {', '.join(map(str, args.files))}\n")

    device = model.trunk.tok_embeddings.weight.device
    # Pairs per batch: each holds both sides, so a batch is 2 x that many sequences, as in training.
    loader = DataLoader(PreferenceDataset(pairs), batch_size=max(1, args.batch_size // 2), shuffle=False,
                        collate_fn=dm._collate())
    gaps = []
    with torch.no_grad():
        for batch in loader:
            B = len(batch["margin_label"])
            s = model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu()  # (2B,)
            gaps.append(s[:B] - s[B:])
            done = sum(g.numel() for g in gaps)
            if len(gaps) % 20 == 0 or done == len(pairs):
                print(f"scored {done}/{len(pairs)} pairs", file=sys.stderr)
    gap = torch.cat(gaps)  # (N,)
    result = {"pairs": int(gap.numel()), "accuracy": float((gap > 0).double().mean()),
              "mean_margin": float(gap.double().mean())}
    print(json.dumps(result))
    return 0


def cli_score(argv: list[str] | None = None) -> int:
    """``llama2-lightning score``: the reward of answers to a prompt, one JSON line each."""
    parser = argparse.ArgumentParser(
        prog="llama2-lightning score",
        description='Print {"prompt", "answer", "score", "sigmoid"} as one JSON line per answer. Give one '
                    "--prompt per --answer (paired in order), or one --prompt for all answers.",
    )
    _add_model_args(parser)
    parser.add_argument("--prompt", action="append", required=True, help="user message (repeatable)")
    parser.add_argument("--answer", action="append", required=True, help="assistant answer (repeatable)")
    args = parser.parse_args(argv)
    prompts: list[str] = args.prompt
    if len(prompts) == 1:
        prompts = prompts * len(args.answer)
    if len(prompts) != len(args.answer):
        parser.error(f"{len(args.prompt)} --prompt for {len(args.answer)} --answer: give one of each per pair, "
                     "or a single --prompt")
    model, _, tokenizer = _load_for_cli(args, parser)
    try:
        scores, probs = score(model, tokenizer, prompts, args.answer, batch_size=args.batch_size)
    except ValueError as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    for prompt, answer, s, p in zip(prompts, args.answer, scores.tolist(), probs.tolist()):
        print(json.dumps({"prompt": prompt, "answer": answer, "score": s, "sigmoid": p}))
    return 0


def cli_export_rm(argv: list[str] | None = None) -> int:
    """``llama2-lightning export-rm``: RewardModule checkpoint -> HF ``LlamaForSequenceClassification``."""
    parser = argparse.ArgumentParser(
        prog="llama2-lightning export-rm",
        description="Export a reward model to Hugging Face's LlamaForSequenceClassification layout (num_labels 1). "
                    "HF reads the score at each row's last token that is not pad_token_id: pad on the right.",
    )
    parser.add_argument("src", metavar="CKPT", type=Path, help="RewardModule .ckpt or sharded checkpoint directory")
    parser.add_argument("dst", metavar="DST", type=Path, help="directory to create")
    parser.add_argument("--pad-id", type=int, default=None,
                        help="pad_token_id for config.json (default: the training tokenizer's, else 0 = <unk>)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.model to copy in (default: recorded)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights")
    parser.add_argument("--force", action="store_true", help="replace a non-empty DST")
    args = parser.parse_args(argv)
    dst: Path = args.dst
    if dst.exists() and (not dst.is_dir() or (any(dst.iterdir()) and not args.force)):
        parser.exit(1, f"{parser.prog}: error: {dst} exists and is not an empty directory; pass --force to replace it\n")
    # Write beside DST and rename, so an interrupted export never leaves a half-written DST.
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        export_reward_model(args.src, tmp, pad_id=args.pad_id, dtype=DTYPES[args.dtype] if args.dtype else None,
                            tokenizer_path=args.tokenizer)
        os.chmod(tmp, 0o755)
        if dst.exists():
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    except (ValueError, KeyError, FileNotFoundError, pickle.UnpicklingError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    print(f"wrote LlamaForSequenceClassification to {dst}")
    return 0
