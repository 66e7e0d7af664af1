"""The body of ``gpu_check.sh``: bf16 training MFU and decode tokens/s vs the bandwidth roofline.

* training: ``--steps`` forward + cross-entropy + backward + AdamW steps of a ~1B config (dim 2048,
  22 layers, 16 heads / 4 KV heads) under bf16 autocast with fp32 master weights; MFU = tokens/s x
  ``flops_per_token`` / the measured bf16 matmul peak (an 8192^2 matmul), and / the datasheet peak
  when ``--datasheet-tflops`` is given;
* decode: ``generate`` greedy, batch ``--decode-batch``, with the model in bf16, eager and
  ``compile=True``; the roofline is the measured copy bandwidth / bytes read per step (all weights
  except the embedding table, plus the KV cache), times the batch.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import markdown_table  # noqa: E402

from llama2_lightning.callbacks.throughput import measure_matmul_peak  # noqa: E402
from llama2_lightning.config import LlamaConfig  # noqa: E402
from llama2_lightning.generation import generate  # noqa: E402
from llama2_lightning.model import Transformer  # noqa: E402

ONE_B = dict(dim=2048, n_layers=22, n_heads=16, n_kv_heads=4, vocab_size=32000, multiple_of=256, max_seq_len=2048)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="bf16 training MFU and decode tokens/s vs the bandwidth roofline")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: tiny config, checks the script")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the config, run nothing")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10, help="timed training steps (after 3 warm-up steps)")
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--no-compile", action="store_true", help="skip the compiled decode row")
    p.add_argument("--datasheet-tflops", type=float, default=None, help="bf16 dense peak for a second MFU column")
    return p


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device, mib: int, repeats: int = 20) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync(device)
    return 2 * src.numel() * repeats / (time.perf_counter() - start)


def train(model: Transformer, args: argparse.Namespace, device: torch.device) -> float:
    """Tokens/s over ``args.steps`` optimiser steps after 3 warm-up steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.randint(3, model.config.vocab_size, (args.batch, args.seq_len + 1), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(x[:, :-1])
        F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    return args.batch * args.seq_len * args.steps / (time.perf_counter() - start)


def decode(model: Transformer, args: argparse.Namespace, device: torch.device, compile: bool) -> float:
    prompts = torch.randint(3, model.config.vocab_size, (args.decode_batch, args.prompt_len)).tolist()
    generate(model, prompts, 8, temperature=0.0, compile=compile)  # warm-up (and compilation)
    sync(device)
    start = time.perf_counter()
    generate(model, prompts, args.new_tokens, temperature=0.0, compile=compile)
    sync(device)
    return args.decode_batch * args.new_tokens / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.device == "cpu":  # the tiny preset and a few tokens: a check of the script, not of the machine
        args.batch, args.seq_len, args.steps = 2, 32, 2
        args.decode_batch, args.prompt_len, args.new_tokens = 2, 8, 8
    config = LlamaConfig(**ONE_B) if args.device == "cuda" else LlamaConfig.from_name("tiny")
    with torch.device("meta"):
        n_params = Transformer(config).num_parameters()
    print(f"device {args.device}; config {config}; {n_params / 1e9:.3f}B parameters")
    print(f"plan: training {args.steps} steps of batch {args.batch} x {args.seq_len} (bf16 autocast, AdamW); "
          f"decode batch {args.decode_batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens (bf16 weights)")
    if args.dry_run:
        return {"dry_run": True, "n_params": n_params}
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu (tiny check) or --dry-run")
    device = torch.device(args.device)
    torch.manual_seed(0)
    with device:
        model = Transformer(config)
    big = args.device == "cuda"
    peak = measure_matmul_peak(torch.bfloat16, size=8192 if big else 256, seconds=2.0 if big else 0.2, device=device)
    tok_s = train(model, args, device)
    mfu = tok_s * model.flops_per_token(args.seq_len) / peak
    rows = [["bf16 training step (autocast, AdamW)", f"{tok_s:,.0f} tok/s",
             f"MFU {mfu:.1%} of measured {peak / 1e12:.1f} TFLOP/s"
             + (f"; {tok_s * model.flops_per_token(args.seq_len) / (args.datasheet_tflops * 1e12):.1%} of datasheet"
                if args.datasheet_tflops else "")]]
    model = model.to(torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "tok_embeddings" not in n)
    kv = 2 * config.n_layers * args.decode_batch * config.n_kv_heads * config.head_dim * \
        (args.prompt_len + args.new_tokens) * 2
    bandwidth = copy_bandwidth(device, 1024 if big else 16)
    roofline = args.decode_batch * bandwidth / (weight_bytes + kv)
    for compiled in ([False] if args.no_compile else [False, True]):
        rate = decode(model, args, device, compiled)
        rows.append([f"decode, batch {args.decode_batch}, {'compile=True' if compiled else 'eager'}",
                     f"{rate:,.0f} tok/s", f"{rate / roofline:.1%} of roofline {roofline:,.0f} tok/s "
                     f"({bandwidth / 1e9:,.0f} GB/s)"])
    table = markdown_table(["measurement", "rate", "against"], rows, align="lrl")
    print(f"\n{table}")
    return {"table": table, "mfu": mfu, "roofline": roofline}


if __name__ == "__main__":
    main()
