"""Figure (c): best-of-K sampling, one prompt batch with K samples each, with vs without prefix reuse.

With reuse: ``generate(prompts, num_samples=K)`` prefills each prompt once and copies its KV cache to
its K rows. Without: ``generate`` on the prompts repeated K times (each copy prefilled). Temperature
1, the same seed, ``max_new_tokens`` each (no EOS), interleaved repetitions, medians; tokens/s counts
the ``B * K * new_tokens`` sampled tokens. The samples of both sides are compared (same logits and
the same random stream give the same samples). The peer here is our own path without reuse.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    CLOCKS, Measurement, common_arguments, format_table, interleaved, parse_args, print_machine,
)

from llama2_lightning.generation import generate  # noqa: E402
from llama2_lightning.model import Transformer  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama-100m")
    p.add_argument("--prompts", type=int, default=4, help="distinct prompts")
    p.add_argument("-k", "--samples", type=int, default=8, help="samples per prompt (K)")
    p.add_argument("--shapes", default=None,
                   help="comma-separated PROMPT_LEN:NEW_TOKENS settings, one table row each (default 64:128,256:64; "
                        "8:8 with --quick)")
    p.add_argument("--compile", action="store_true", help="compiled decode step on both sides")
    p.add_argument("--quick", action="store_true", help="tiny preset, 2 prompts x K=3, 8:8 (smoke test)")
    return common_arguments(p)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(build_parser(), argv, preset="tiny", prompts=2, samples=3, repeats=1, warmup=0)
    default_shapes = "8:8" if args.quick else "64:128,256:64"
    shapes = [tuple(int(v) for v in s.split(":")) for s in (args.shapes or default_shapes).split(",")]
    torch.manual_seed(args.seed)
    model = Transformer.from_name(args.preset).float().eval()
    print_machine(model, args.preset)
    g = torch.Generator().manual_seed(args.seed + 1)
    clock, K, rows, identical = CLOCKS[args.clock], args.samples, [], []
    for prompt_len, new in shapes:
        prompts = torch.randint(3, model.config.vocab_size, (args.prompts, prompt_len), generator=g).tolist()
        repeated = [p for p in prompts for _ in range(K)]
        m = Measurement(f"best-of-{K}, {args.prompts} prompts x {prompt_len} tokens, {new} new tokens",
                        args.prompts * K * new)

        def reuse(prompts=prompts, new=new):
            return generate(model, prompts, new, temperature=1.0, seed=7, num_samples=K, compile=args.compile)

        def plain(repeated=repeated, new=new):
            return generate(model, repeated, new, temperature=1.0, seed=7, compile=args.compile)

        a, b = interleaved(m, reuse, plain, args.repeats, args.warmup, clock=clock)
        identical.append(bool(torch.equal(a.tokens, b.tokens)))
        rows.append(m)
    print(f"  samples identical with and without reuse: {identical}")
    table = format_table(rows, ours="prefix reuse", theirs="no reuse")
    print(f"\n{table}")
    return {"table": table, "measurements": rows, "samples_identical": identical}


if __name__ == "__main__":
    main()
