"""``llama2-lightning generate``: sample continuations of plain-text prompts from a checkpoint or a preset."""

from __future__ import annotations

import argparse
import torch

from llama2_lightning.checkpoint import load_model
from llama2_lightning.commands.arg_types import positive_int, probability_mass, temperature
from llama2_lightning.generation import generate
from llama2_lightning.model import Transformer
from llama2_lightning.tokenizer import Tokenizer, find_tokenizer


def cli_generate(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llama2-lightning generate", description="Sample a continuation.")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="HF or Meta directory (with its tokenizer), a Lightning .ckpt or a .gguf")
    src.add_argument("--preset", help="random weights of a named preset, e.g. tiny (a smoke test of the stack)")
    parser.add_argument("--tokenizer", help="tokenizer.model, tokenizer.json or a directory holding one "
                                            "(default: the one beside or inside --checkpoint)")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--temperature", type=temperature, default=0.8, help="0 samples greedily")
    parser.add_argument("--top-p", type=probability_mass, default=0.95)
    parser.add_argument("--top-k", type=positive_int, default=None, help="keep the k most likely tokens (k >= 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    tok_path = args.tokenizer or (find_tokenizer(args.checkpoint) if args.checkpoint else None)
    if tok_path is None:
        parser.error("no tokenizer.model or tokenizer.json beside --checkpoint: pass --tokenizer PATH")
    tokenizer = Tokenizer(tok_path)
    if args.checkpoint:
        try:
            model = load_model(args.checkpoint)
        except (FileNotFoundError, ValueError) as err:
            parser.exit(1, f"{parser.prog}: error: {err}\n")
    else:
        torch.manual_seed(args.seed)
        model = Transformer.from_name(args.preset, vocab_size=tokenizer.vocab_size)
    if model.config.vocab_size < tokenizer.vocab_size:
        parser.error(f"model vocab_size {model.config.vocab_size} < tokenizer's {tokenizer.vocab_size}")
    prompts = [tokenizer.encode(p, bos=tokenizer.add_bos) for p in args.prompt]
    out = generate(model, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, seed=args.seed)
    for prompt, new in zip(args.prompt, out.as_lists()):
        print(prompt + tokenizer.decode([t for t in new if t != tokenizer.eos_id]))
        print("-" * 40)
    return 0
