"""Greedy generation tokens/s on a real converted checkpoint (e.g. SmolLM2-135M-Instruct from its GGUF),
ours vs transformers' ``generate`` on the same weights.

Ours: ``load_model(CHECKPOINT)`` + ``generate(temperature=0, eos_id=None)``. Theirs:
``LlamaForCausalLM.from_pretrained(CHECKPOINT)`` (a Hugging Face directory, as ``convert --from gguf
--to hf`` writes) + ``generate(do_sample=False)``. Both produce exactly ``new_tokens`` per row from the
same chat prompts (ChatML when the tokenizer has a template); prefill is inside the timing; tokens/s
counts new tokens. The greedy tokens are compared.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llama2_lightning.chat import encode_prompt
from llama2_lightning.chat_template import resolve_chat_template
from llama2_lightning.checkpoint import load_model
from llama2_lightning.tokenizer import Tokenizer, find_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    CLOCKS, Measurement, common_arguments, format_table, generate_ours, generate_theirs, interleaved, parse_args,
    print_machine,
)

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "How do I reverse a list in Python?",
             "Why is the sky blue?", "Name three prime numbers.", "What is 12 times 7?", "Who wrote Hamlet?",
             "Give me a tip for sleeping better."]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="Hugging Face directory (with tokenizer.json or tokenizer.model)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="batch 1, 8 new tokens, 1 repeat (smoke test)")
    return common_arguments(p)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from transformers import LlamaForCausalLM

    args = parse_args(build_parser(), argv, batch=[1], new_tokens=8, repeats=1, warmup=0)
    ours = load_model(args.checkpoint).eval()
    theirs = LlamaForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32, attn_implementation="sdpa").eval()
    print_machine(ours, args.checkpoint.name)
    tokenizer = Tokenizer(find_tokenizer(args.checkpoint) or args.checkpoint)
    template = resolve_chat_template("model" if tokenizer.chat_template else "llama2", tokenizer)
    encoded = [encode_prompt(tokenizer, [{"role": "user", "content": q}], template=template) for q in QUESTIONS]
    rows, identical = [], {}
    for batch in args.batch:
        # Equal-length rows (the longest prompts cut from the left) so neither side pads.
        length = min(len(e) for e in encoded)
        prompts = torch.tensor([e[-length:] for e in (encoded * batch)[:batch]])
        m = Measurement(f"greedy generation, batch {batch}, prompt {length}, {args.new_tokens} new tokens",
                        batch * args.new_tokens)
        tok_ours, tok_theirs = interleaved(m, lambda: generate_ours(ours, prompts, args.new_tokens),
                                           lambda: generate_theirs(theirs, prompts, args.new_tokens), args.repeats,
                                           args.warmup, clock=CLOCKS[args.clock])
        identical[batch] = bool(torch.equal(tok_ours, tok_theirs))
        rows.append(m)
    print(f"  greedy tokens identical to transformers: {identical}")
    table = format_table(rows)
    print(f"\n{table}")
    return {"table": table, "measurements": rows, "tokens_identical": identical}


if __name__ == "__main__":
    main()
