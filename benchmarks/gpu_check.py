"""The body of ``gpu_check.sh``: bf16 training MFU, ours vs transformers, and decode tokens/s vs the
bandwidth roofline.

* training: ``--steps`` forward + cross-entropy + backward + AdamW steps of a ~1B config (dim 2048,
  22 layers, 16 heads / 4 KV heads) under bf16 autocast with fp32 master weights, for ours and for
  transformers' ``LlamaForCausalLM`` (sdpa) holding the same weights, each eager and with every block
  through ``torch.compile``; MFU = tokens/s x ``flops_per_token`` / the measured bf16 matmul peak (an
  8192^2 matmul), and / the datasheet peak when ``--datasheet-tflops`` is given;
* decode: ``generate`` greedy, batch ``--decode-batch``, with the model in bf16, eager and
  ``compile=True``; the roofline is the measured copy bandwidth / bytes read per step (all weights
  except the embedding table, plus the KV cache), times the batch.

Each row is printed as soon as it is measured and, with ``--json``, written to that file, so a run cut
short by the timeout still reports what it finished; a row that fails prints its error and the rest go on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import build_models, logits_max_diff, markdown_table  # noqa: E402

from llama2_lightning import generation  # noqa: E402
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
    p.add_argument("--no-compile", action="store_true", help="skip the compiled training and decode rows")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers training rows")
    p.add_argument("--json", default=None, help="also write the results to this file, after every row")
    p.add_argument("--datasheet-tflops", type=float, default=None, help="bf16 dense peak for a second MFU column")
    return p


def flop_rate(flops: float) -> str:
    return f"{flops / 1e12:.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP/s"


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


def train(model: nn.Module, forward: Callable[[Tensor], Tensor], args: argparse.Namespace,
          device: torch.device) -> float:
    """Tokens/s over ``args.steps`` optimiser steps after 3 warm-up steps (the first compiles, if any)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(3, model.config.vocab_size, (args.batch, args.seq_len + 1), device=device, generator=g)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = forward(x[:, :-1])  # (B, T, V)
        F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(3):
        step()
    sync(device)
    print(f"  warm-up (3 steps, compiling if compiled): {time.perf_counter() - start:.1f}s", flush=True)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    return args.batch * args.seq_len * args.steps / (time.perf_counter() - start)


def decode(model: Transformer, args: argparse.Namespace, device: torch.device, compile: bool) -> float:
    """Greedy tokens/s; the untimed first call has the same shapes (it compiles and records, if any)."""
    prompts = torch.randint(3, model.config.vocab_size, (args.decode_batch, args.prompt_len)).tolist()
    generate(model, prompts, args.new_tokens, temperature=0.0, compile=compile)
    sync(device)
    start = time.perf_counter()
    generate(model, prompts, args.new_tokens, temperature=0.0, compile=compile)
    sync(device)
    return args.decode_batch * args.new_tokens / (time.perf_counter() - start)


def decode_agreement(model: Transformer, args: argparse.Namespace, steps: int = 16) -> str:
    """Compiled vs eager greedy decoding of other prompts of the same shapes (no recompilation).

    In bf16 two correct implementations pick different tokens at a near-tie now and then, and a row's
    later logits then describe another text, so logits are compared up to each row's first differing
    token (that step included: its inputs were still the same). Reports the largest such difference
    relative to the largest eager logit, and how many rows chose the same ``steps`` tokens."""
    prompts = torch.randint(3, model.config.vocab_size, (args.decode_batch, args.prompt_len)).tolist()
    eager = generate(model, prompts, args.new_tokens, temperature=0.0, output_logits=True)
    compiled = generate(model, prompts, args.new_tokens, temperature=0.0, output_logits=True, compile=True)
    steps = min(steps, eager.tokens.size(1), compiled.tokens.size(1))
    differ = compiled.tokens[:, :steps] != eager.tokens[:, :steps]  # (B, steps)
    same_so_far = (differ.cumsum(dim=1) - differ.long()) == 0  # (B, steps): no earlier token differs
    diff = (compiled.logits[:, :steps] - eager.logits[:, :steps]).abs().amax(dim=-1)  # (B, steps)
    rel = float(diff[same_so_far].max() / eager.logits[:, :steps].abs().max())
    rows = int((~differ.any(dim=1)).sum())
    return (f"logits within {rel:.1e} of eager (relative) up to each row's first differing token; "
            f"{rows}/{len(prompts)} rows chose the same {steps} tokens")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.device == "cpu":  # the tiny preset and a few tokens: a check of the script, not of the machine
        args.batch, args.seq_len, args.steps = 2, 32, 2
        args.decode_batch, args.prompt_len, args.new_tokens = 2, 8, 8
    config = LlamaConfig(**ONE_B) if args.device == "cuda" else LlamaConfig.from_name("tiny")
    with torch.device("meta"):
        n_params = Transformer(config).num_parameters()
    print(f"device {args.device}; config {config}; {n_params / 1e9:.3f}B parameters")
    print(f"plan: training {args.steps} steps of batch {args.batch} x {args.seq_len} (bf16 autocast, AdamW), "
          f"ours{'' if args.no_transformers else ' and transformers'}, "
          f"eager{'' if args.no_compile else ' and compiled blocks'}; "
          f"decode batch {args.decode_batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens (bf16 weights)")
    if args.dry_run:
        return {"dry_run": True, "n_params": n_params}
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu (tiny check) or --dry-run")
    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)
    rows: list[list[str]] = []
    results: dict[str, Any] = {"rows": rows, "failed": {}}

    def record(name: str, rate: str, against: str) -> None:
        rows.append([name, rate, against])
        print(f"| {name} | {rate} | {against} |", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    def attempt(name: str, fn: Callable[[], Any]) -> Any:
        """Run one measurement; a failure is reported and recorded, and the others still run."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 -- one broken row must not cost the device run the others
            print(f"FAILED {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
            results["failed"][name] = f"{type(e).__name__}: {e}"
            return None

    big = args.device == "cuda"
    peak = measure_matmul_peak(torch.bfloat16, size=8192 if big else 256, seconds=2.0 if big else 0.2, device=device)
    results["matmul_peak_tflops"] = peak / 1e12

    if args.no_transformers:
        torch.manual_seed(0)
        with device:
            model, theirs = Transformer(config), None
    else:
        model, theirs = build_models(config, seed=0, device=device)
        diff = logits_max_diff(model, theirs, batch=1, seq_len=min(64, args.seq_len))
        results["logits_max_diff_fp32"] = diff
        print(f"logits parity (fp32, same weights): max |ours - theirs| = {diff:.2e}", flush=True)
        if diff >= 1e-2:
            raise SystemExit(f"logits differ by {diff:.2e}: the weight copy is wrong")
        theirs.train()
    model.train()
    per_token = model.flops_per_token(args.seq_len)  # theirs is the same model: the same count

    def against(rate: float, theirs_rate: float | None) -> str:
        text = f"MFU {rate * per_token / peak:.1%} of measured {flop_rate(peak)}"
        if args.datasheet_tflops:
            text += f"; {rate * per_token / (args.datasheet_tflops * 1e12):.1%} of datasheet"
        if theirs_rate:
            text += f"; {rate / theirs_rate:.2f}x transformers"
        return text

    def training_rows(label: str) -> None:
        theirs_rate = None
        if theirs is not None:
            theirs_rate = attempt(f"transformers {label}", lambda: train(
                theirs, lambda t: theirs(input_ids=t, use_cache=False).logits, args, device))
            if theirs_rate:
                record(f"bf16 training step, transformers, {label}", f"{theirs_rate:,.0f} tok/s",
                       against(theirs_rate, None))
        rate = attempt(f"ours {label}", lambda: train(model, model, args, device))
        if rate:
            results.setdefault("mfu", rate * per_token / peak)
            record(f"bf16 training step, ours, {label}", f"{rate:,.0f} tok/s", against(rate, theirs_rate))

    # eager rows first, compiled rows after: a run cut short by the timeout still has every eager number
    with device:  # decode from a separate copy of the same weights, in bf16
        decoder = Transformer(config)
    decoder.load_state_dict(model.state_dict())
    decoder = decoder.to(torch.bfloat16).eval()
    weight_bytes = sum(p.numel() * p.element_size() for n, p in decoder.named_parameters() if "tok_embeddings" not in n)
    kv = 2 * config.n_layers * args.decode_batch * config.n_kv_heads * config.head_dim * \
        (args.prompt_len + args.new_tokens) * 2
    bandwidth = copy_bandwidth(device, 1024 if big else 16)
    roofline = args.decode_batch * bandwidth / (weight_bytes + kv)
    results["roofline"] = roofline

    def decode_row(compiled: bool, label: str) -> None:
        name = f"decode, batch {args.decode_batch}, {label}"
        rate = attempt(name, lambda: decode(decoder, args, device, compiled))
        if rate:
            text = f"{rate / roofline:.1%} of roofline {roofline:,.0f} tok/s ({bandwidth / 1e9:,.0f} GB/s)"
            if compiled:
                text += "; " + (attempt(f"{name} agreement", lambda: decode_agreement(decoder, args)) or "no check")
            record(name, f"{rate:,.0f} tok/s", text)

    def decode_compiled_rows() -> None:
        if device.type == "cuda":  # plain inductor kernels first, then the library's default, a CUDA graph
            generation.CUDA_COMPILE_MODE = "default"
            decode_row(True, "compile=True, no CUDA graph")
            generation.CUDA_COMPILE_MODE = "reduce-overhead"
            decoder.__dict__.pop("_compiled_decode", None)  # a fresh compiled step in the new mode
            torch._dynamo.reset()
        decode_row(True, "compile=True")

    training_rows("eager")
    decode_row(False, "eager")
    if not args.no_compile:
        for block in model.layers:
            block.compile()
        if theirs is not None:
            for layer in theirs.model.layers:
                layer.compile()
        training_rows("compiled blocks")
        decode_compiled_rows()
    table = markdown_table(["measurement", "rate", "against"], rows, align="lrl")
    print(f"\n{table}")
    if results["failed"]:
        print(f"failed: {', '.join(results['failed'])}")
    results["table"] = table
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
