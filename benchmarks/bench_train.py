"""Figure (a): training step tokens/s, ours vs transformers' LlamaForCausalLM (sdpa), same weights.

Forward + cross-entropy + backward (no optimiser), ours and theirs interleaved repetition by repetition;
medians. ``--compile`` adds a row with each of our blocks through ``torch.compile`` (the first call,
which compiles, is untimed and reported). ``--quick``: tiny preset, seconds, numbers mean nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    CLOCKS, LOGITS_TOLERANCE, Measurement, build_models, common_arguments, format_table, interleaved,
    gemm_seconds, logits_max_diff, markdown_table, next_token_batch, parse_args, print_machine,
    train_step_ours, train_step_theirs, training_shape_arguments,
)


def build_parser() -> argparse.ArgumentParser:
    p = training_shape_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--compile", action="store_true", help="also time ours with torch.compile'd blocks")
    p.add_argument("--profile", action="store_true",
                   help="also profile one step of each (ours with compiled blocks under --compile): the GEMM "
                        "share, and the most any change that keeps our GEMMs could gain")
    p.add_argument("--quick", action="store_true", help="tiny preset, batch 2 x 16, 1 repeat (smoke test)")
    return common_arguments(p)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(build_parser(), argv, preset="tiny", batch=2, seq_len=16, repeats=1, warmup=0)
    ours, theirs = build_models(args.preset, args.seed)
    print_machine(ours, args.preset)
    diff = logits_max_diff(ours, theirs, batch=2, seq_len=min(64, args.seq_len))
    if diff >= LOGITS_TOLERANCE:
        raise SystemExit(f"logits differ by {diff:.2e}: the weight copy is wrong")
    print(f"logits parity: max |ours - theirs| = {diff:.2e}")
    g = torch.Generator().manual_seed(args.seed + 1)
    x, y = next_token_batch(ours.config.vocab_size, args.batch, args.seq_len, g)
    ours.train()
    theirs.train()
    clock = CLOCKS[args.clock]
    rows = [Measurement(f"training step fp32, batch {args.batch} x seq {args.seq_len}", x.numel())]
    losses = interleaved(rows[0], lambda: train_step_ours(ours, x, y), lambda: train_step_theirs(theirs, x, y),
                         args.repeats, args.warmup, clock=clock)
    compile_s = None
    if args.compile:
        for block in ours.layers:
            block.compile()
        start = time.perf_counter()
        train_step_ours(ours, x, y)
        compile_s = time.perf_counter() - start
        print(f"  compiling the blocks (first step): {compile_s:.1f}s")
        rows.append(Measurement(f"training step fp32, compiled blocks, batch {args.batch} x seq {args.seq_len}",
                                x.numel()))
        interleaved(rows[1], lambda: train_step_ours(ours, x, y), lambda: train_step_theirs(theirs, x, y),
                    args.repeats, 0, clock=clock)
    table = format_table(rows)
    print(f"\n{table}")
    bound = gemm_bound(ours, theirs, x, y, statistics.median(rows[0].theirs_s)) if args.profile else None
    return {"table": table, "measurements": rows, "logits_max_diff": diff, "loss": losses, "compile_s": compile_s,
            "gemm_bound": bound}


def gemm_bound(ours: torch.nn.Module, theirs: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
               theirs_step_s: float) -> dict[str, float]:
    """Profile one step of each. If our step did its GEMMs as it does now and everything else took no
    time, it would run at most ``theirs' timed step (median) / our GEMM time`` times theirs: a ceiling
    on the ratio for any fusion or compilation that leaves the GEMMs alone."""
    ours_gemm, ours_total = gemm_seconds(lambda: train_step_ours(ours, x, y))
    theirs_gemm, theirs_total = gemm_seconds(lambda: train_step_theirs(theirs, x, y))
    ceiling = theirs_step_s / ours_gemm
    print("\n" + markdown_table(
        ["profiled step", "GEMM s", "all operators s", "GEMM share"],
        [["ours", f"{ours_gemm:.3f}", f"{ours_total:.3f}", f"{ours_gemm / ours_total:.1%}"],
         ["transformers", f"{theirs_gemm:.3f}", f"{theirs_total:.3f}", f"{theirs_gemm / theirs_total:.1%}"]],
        align="lrrr"))
    print(f"ceiling for any change that keeps our GEMMs: their timed step {theirs_step_s:.3f}s / our GEMMs "
          f"{ours_gemm:.3f}s = {ceiling:.2f}x transformers")
    return {"ours_gemm_s": ours_gemm, "ours_total_s": ours_total, "theirs_gemm_s": theirs_gemm,
            "theirs_total_s": theirs_total, "theirs_step_s": theirs_step_s, "ceiling": ceiling}


if __name__ == "__main__":
    main()
