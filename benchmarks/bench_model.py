"""Benchmark this package's Transformer against transformers' LlamaForCausalLM (SDPA) on CPU.

Both models hold the same fp32 weights (ours built with a fixed seed, copied into Hugging Face's
layout with the RoPE row permutation of ``wq``/``wk``). Before anything is timed the logits of both
are compared (max abs diff < 1e-3). Two measurements, ours and theirs interleaved repetition by
repetition so that other load on the machine hits both alike; the median is reported:

* training step: forward + cross-entropy + backward (gradients zeroed between steps, no optimizer),
  tokens/s = batch * seq_len / step time;
* batched greedy generation: ``llama2_lightning.generation.generate(temperature=0)`` versus
  ``LlamaForCausalLM.generate(do_sample=False)`` on the same random prompts, exactly ``new_tokens``
  per row (no EOS), tokens/s = gen_batch * new_tokens / wall time (prefill included). The generated
  tokens of both are compared as a correctness check.

Run ``python benchmarks/bench_model.py`` (see benchmarks/README.md); ``--quick`` is a seconds-long
smoke run on the ``tiny`` preset used by tests/test_bench_model.py. The per-figure scripts
(``bench_train.py``, ``bench_generate.py``, ...) measure the same things one table each; this one
keeps the two-row summary.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402, F401  (re-exported: tests/test_bench_model.py uses to_hf_state_dict)
    CLOCKS, LOGITS_TOLERANCE, Measurement, build_models, cpu_model, format_table, generate_ours, generate_theirs,
    interleaved, load_average, logits_max_diff, next_token_batch, parse_args, to_hf_state_dict,
    train_step_ours, train_step_theirs, training_shape_arguments,
)


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = training_shape_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--gen-batch", type=int, default=8, help="generation batch size")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt length (tokens) for generation")
    p.add_argument("--new-tokens", type=int, default=128, help="new tokens generated per row")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per model and measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per model and measurement")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall: elapsed time (default). cpu: this process's CPU time, which other processes on a "
                        "busy machine barely disturb; meaningful with --threads 1 (with more threads it counts "
                        "the spin-waiting of idle worker threads too)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="tiny preset, a few tokens, 1 repeat, no warm-up (smoke test; numbers mean nothing)")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(build_parser(), argv, preset="tiny", batch=2, seq_len=16, gen_batch=2, prompt_len=8,
                      new_tokens=8, repeats=1, warmup=0)

    import transformers

    ours, theirs = build_models(args.preset, args.seed)
    config = ours.config
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}")
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs), load average at start: {load_average()}")
    print(f"preset {args.preset}: {ours.num_parameters() / 1e6:.1f}M parameters, dim {config.dim}, "
          f"{config.n_layers} layers, {config.n_heads} heads / {config.n_kv_heads} KV heads, vocab {config.vocab_size}")

    diff = logits_max_diff(ours, theirs, batch=2, seq_len=min(64, args.seq_len))
    logits_ok = diff < LOGITS_TOLERANCE
    print(f"logits parity: max |ours - theirs| = {diff:.2e} ({'ok' if logits_ok else 'FAILED'}, tolerance "
          f"{LOGITS_TOLERANCE:g})")
    if not logits_ok:
        raise SystemExit(f"logits differ by {diff:.2e} >= {LOGITS_TOLERANCE:g}: the weight copy is wrong, not timing")

    g = torch.Generator().manual_seed(args.seed + 1)
    x, y = next_token_batch(config.vocab_size, args.batch, args.seq_len, g)
    prompts = torch.randint(3, config.vocab_size, (args.gen_batch, args.prompt_len), generator=g)

    train = Measurement(f"training step (fwd+bwd), batch {args.batch} x seq {args.seq_len}", args.batch * args.seq_len)
    gen = Measurement(
        f"greedy generation, batch {args.gen_batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens",
        args.gen_batch * args.new_tokens,
    )

    clock = CLOCKS[args.clock]
    print(f"\ntiming: {args.warmup} warm-up + {args.repeats} timed repetitions each, ours/theirs interleaved, "
          f"{'wall-clock' if args.clock == 'wall' else 'process CPU'} time, medians reported")
    ours.train()
    theirs.train()
    loss_ours, loss_theirs = interleaved(
        train, lambda: train_step_ours(ours, x, y), lambda: train_step_theirs(theirs, x, y), args.repeats, args.warmup,
        clock=clock,
    )
    print(f"  training loss: ours {loss_ours:.5f}, theirs {loss_theirs:.5f}")

    ours.eval()
    theirs.eval()
    tok_ours, tok_theirs = interleaved(
        gen, lambda: generate_ours(ours, prompts, args.new_tokens),
        lambda: generate_theirs(theirs, prompts, args.new_tokens), args.repeats, args.warmup, clock=clock,
    )
    same_shape = tok_ours.shape == tok_theirs.shape
    tokens_equal = same_shape and bool(torch.equal(tok_ours, tok_theirs))
    agree = float((tok_ours == tok_theirs).float().mean()) if same_shape else 0.0
    print(f"  greedy tokens identical: {tokens_equal} (shapes {tuple(tok_ours.shape)} / {tuple(tok_theirs.shape)}, "
          f"{agree:.1%} of positions agree)")

    table = format_table([train, gen])
    print()
    if args.clock == "cpu":
        print("(tok/s per second of process CPU time)")
    print(table)
    print()
    for m in (train, gen):
        print(f"{m.name}: median s/call ours {statistics.median(m.ours_s):.3f}, theirs {statistics.median(m.theirs_s):.3f}; "
              f"fastest repetition ours {min(m.ours_s):.3f}, theirs {min(m.theirs_s):.3f} (ratio {m.best_ratio:.2f})")
    print(f"\nload average at end: {load_average()}")
    return {
        "table": table,
        "measurements": {"train": train, "generate": gen},
        "logits_max_diff": diff,
        "logits_ok": logits_ok,
        "tokens_equal": tokens_equal,
        "token_agreement": agree,
        "loss": (loss_ours, loss_theirs),
        "args": vars(args),
        "clock": args.clock,
    }


if __name__ == "__main__":
    main()
