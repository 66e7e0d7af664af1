"""Figure (b): batched greedy generation tokens/s, ours vs transformers' ``generate``, same weights.

Ours: ``generate(temperature=0, eos_id=None)`` eager, and with ``compile=True`` (the decode step through
inductor with frozen weights; its first call compiles and is untimed, its duration printed). Theirs:
``LlamaForCausalLM.generate(do_sample=False)`` with its default dynamic cache. Both produce exactly
``new_tokens`` per row from the same random prompts; prefill is inside the timing; tokens/s counts
new tokens. The greedy tokens of every side are compared.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    CLOCKS, Measurement, build_models, common_arguments, format_table, generate_ours, generate_theirs,
    interleaved, parse_args, print_machine,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama-100m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--no-compile", action="store_true", help="skip the compiled-decode row")
    p.add_argument("--quick", action="store_true", help="tiny preset, 2 x (8 + 8) tokens, 1 repeat (smoke test)")
    return common_arguments(p)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(build_parser(), argv, preset="tiny", batch=2, prompt_len=8, new_tokens=8, repeats=1, warmup=0)
    ours, theirs = build_models(args.preset, args.seed)
    ours.eval()
    theirs.eval()
    print_machine(ours, args.preset)
    g = torch.Generator().manual_seed(args.seed + 1)
    prompts = torch.randint(3, ours.config.vocab_size, (args.batch, args.prompt_len), generator=g)
    n = args.batch * args.new_tokens
    what = f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens"
    clock = CLOCKS[args.clock]
    rows = [Measurement(f"greedy generation (eager), {what}", n)]
    tok_ours, tok_theirs = interleaved(rows[0], lambda: generate_ours(ours, prompts, args.new_tokens),
                                       lambda: generate_theirs(theirs, prompts, args.new_tokens), args.repeats,
                                       args.warmup, clock=clock)
    identical = {"eager": bool(torch.equal(tok_ours, tok_theirs))}
    compile_s = None
    if not args.no_compile:
        start = time.perf_counter()
        generate_ours(ours, prompts, args.new_tokens, compile=True)
        compile_s = time.perf_counter() - start
        print(f"  first compiled call (compiles the decode step): {compile_s:.1f}s")
        rows.append(Measurement(f"greedy generation (compile=True), {what}", n))
        tok_c, _ = interleaved(rows[1], lambda: generate_ours(ours, prompts, args.new_tokens, compile=True),
                               lambda: generate_theirs(theirs, prompts, args.new_tokens), args.repeats, 0,
                               clock=clock)
        identical["compiled"] = bool(torch.equal(tok_c, tok_theirs))
    print(f"  greedy tokens identical to transformers: {identical}")
    table = format_table(rows)
    print(f"\n{table}")
    return {"table": table, "measurements": rows, "tokens_identical": identical, "compile_s": compile_s}


if __name__ == "__main__":
    main()
