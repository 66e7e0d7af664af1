"""Figure (e): model FLOPs utilisation of a training step against this machine's measured matmul peak.

The peak is ``measure_matmul_peak`` (a square matmul, fp32 and bf16: what this box achieves, not a
datasheet number). A training step is forward + cross-entropy + backward, fp32, or bf16 autocast
(Lightning's ``bf16-mixed``: fp32 weights, bf16 matmuls); MFU = tokens/s x 6N-plus-attention FLOPs per
token (``Transformer.flops_per_token``) / peak. Ours and transformers' Llama, same weights, interleaved.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    CLOCKS, Measurement, build_models, common_arguments, interleaved, markdown_table, parse_args, print_machine,
    next_token_batch, train_step_ours, train_step_theirs, training_shape_arguments,
)

from llama2_lightning.callbacks.throughput import measure_matmul_peak  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    p = training_shape_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast)")
    p.add_argument("--peak-size", type=int, default=1024, help="side of the square matmul that measures the peak")
    p.add_argument("--peak-seconds", type=float, default=2.0)
    p.add_argument("--quick", action="store_true", help="tiny preset, batch 2 x 16, 1 repeat (smoke test)")
    return common_arguments(p)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(build_parser(), argv, preset="tiny", batch=2, seq_len=16, repeats=1, warmup=0,
                      peak_size=256, peak_seconds=0.2)
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    unknown = sorted(set(dtypes) - set(DTYPES))
    if unknown:
        raise SystemExit(f"--dtypes: unknown {unknown}; allowed: {', '.join(DTYPES)}")
    ours, theirs = build_models(args.preset, args.seed)
    print_machine(ours, args.preset)
    ours.train()
    theirs.train()
    g = torch.Generator().manual_seed(args.seed + 1)
    x, y = next_token_batch(ours.config.vocab_size, args.batch, args.seq_len, g)
    flops_per_token = ours.flops_per_token(args.seq_len)
    rows, out = [], {}
    for name in dtypes:
        peak = measure_matmul_peak(DTYPES[name], size=args.peak_size, seconds=args.peak_seconds)

        def ctx():
            if name == "fp32":
                return contextlib.nullcontext()
            return torch.autocast("cpu", dtype=DTYPES[name])

        def step_ours():
            with ctx():
                return train_step_ours(ours, x, y)

        def step_theirs():
            with ctx():
                return train_step_theirs(theirs, x, y)

        m = Measurement(f"training step {name}", x.numel())
        interleaved(m, step_ours, step_theirs, args.repeats, args.warmup, clock=CLOCKS[args.clock])
        mfu_ours, mfu_theirs = (tok * flops_per_token / peak for tok in (m.ours_tok_s, m.theirs_tok_s))
        out[name] = {"peak_flops": peak, "ours_mfu": mfu_ours, "theirs_mfu": mfu_theirs, "measurement": m}
        rows.append([f"{name}, batch {args.batch} x seq {args.seq_len}", f"{peak / 1e9:.1f}", f"{m.ours_tok_s:.1f}",
                     f"{mfu_ours:.1%}", f"{m.theirs_tok_s:.1f}", f"{mfu_theirs:.1%}"])
    print(f"FLOPs per token (6N + attention): {flops_per_token / 1e6:.1f}M")
    table = markdown_table(["training step", "matmul peak GFLOP/s", "ours tok/s", "ours MFU", "transformers tok/s",
                            "transformers MFU"], rows)
    print(f"\n{table}")
    return {"table": table, "results": out, "flops_per_token": flops_per_token}


if __name__ == "__main__":
    main()
