"""Issue 18's single-GPU check: the tensor-parallel code path at TP = 1 against the plain path.

One process, a 1-rank process group (NCCL on CUDA, gloo on CPU) and a 1-D ``tensor_parallel`` mesh of
size 1. The same weights run twice: plain, and through ``apply_tensor_parallel`` (the exact DTensor
plan a TP-8 run uses, every weight a 1-shard DTensor, the logits vocabulary-sharded for
``loss_parallel``). Training never takes the TP path at size 1, so what this measures is the cost
of the DTensor dispatch itself, per training step and per decoded token: a regression shows up as a
ratio below 1. Logits are compared first (they must agree to fp32 rounding).

``--quick``: tiny preset, seconds, numbers mean nothing (the CI smoke test). On a GPU:
``python benchmarks/bench_tensor_parallel.py --device cuda --dtype bfloat16 --preset llama2-7b --batch 1
--seq-len 2048`` (two bf16 copies of 7B with their gradients: about 55 GB). Not yet run on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    CLOCKS, Measurement, common_arguments, format_table, interleaved, next_token_batch, parse_args, print_machine,
    training_shape_arguments,
)

from llama2_lightning.config import LlamaConfig  # noqa: E402
from llama2_lightning.generation import generate  # noqa: E402
from llama2_lightning.model import Transformer  # noqa: E402
from llama2_lightning.tensor_parallel import (  # noqa: E402
    TP_DIM, apply_tensor_parallel, cross_entropy, loss_backward_context,
)


def build_parser() -> argparse.ArgumentParser:
    p = training_shape_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and activations")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per prompt")
    p.add_argument("--decode-batch", type=int, default=8, help="prompts decoded together")
    p.add_argument("--quick", action="store_true", help="tiny preset, batch 2 x 16, 1 repeat (smoke test)")
    return common_arguments(p)


def _init_one_rank(device: str) -> bool:
    """Start a 1-rank process group unless one runs; True when this call started it."""
    if dist.is_initialized():
        return False
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    return True


def _train_step(model: Transformer, x: torch.Tensor, y: torch.Tensor) -> float:
    logits = model(x, sharded_logits=True)  # (B, T, V): a vocabulary-sharded DTensor on the TP path
    loss = cross_entropy(logits.flatten(0, 1), y.flatten())
    with loss_backward_context(model):
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(loss.detach())


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(build_parser(), argv, preset="tiny", batch=2, seq_len=16, repeats=1, warmup=0, new_tokens=4,
                      decode_batch=2)
    started = _init_one_rank(args.device)
    try:
        return _run(args)
    finally:
        if started:  # leave no process group behind for the caller (the test process runs other tests)
            dist.destroy_process_group()


def _run(args: argparse.Namespace) -> dict[str, Any]:
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    plain = Transformer(LlamaConfig.from_name(args.preset)).to(device=args.device, dtype=dtype)
    tp = apply_tensor_parallel(copy.deepcopy(plain), init_device_mesh(args.device, (1,), mesh_dim_names=(TP_DIM,)))
    print_machine(plain, args.preset)
    g = torch.Generator().manual_seed(args.seed + 1)
    x, y = (t.to(args.device) for t in next_token_batch(plain.config.vocab_size, args.batch, args.seq_len, g))
    with torch.no_grad():
        diff = float((plain(x).float() - tp(x).float()).abs().max())
    print(f"logits: max |plain - TP=1| = {diff:.2e}")
    clock = CLOCKS[args.clock]

    def timed(fn: Any) -> Any:
        def run() -> Any:
            out = fn()
            _sync(args.device)
            return out
        return run

    train = Measurement(f"training step {args.dtype}, batch {args.batch} x seq {args.seq_len}", x.numel())
    losses = interleaved(train, timed(lambda: _train_step(tp, x, y)), timed(lambda: _train_step(plain, x, y)),
                         args.repeats, args.warmup, clock=clock)
    prompts = [list(range(1, 9)) for _ in range(args.decode_batch)]
    decode = Measurement(f"decode, batch {args.decode_batch}, {args.new_tokens} new tokens",
                         args.decode_batch * args.new_tokens)
    # ignore EOS (eos_id=None): both sides decode exactly new_tokens per row, the same token count
    tokens = interleaved(decode, timed(lambda: generate(tp, prompts, args.new_tokens, temperature=0.0, eos_id=None)),
                         timed(lambda: generate(plain, prompts, args.new_tokens, temperature=0.0, eos_id=None)),
                         args.repeats, args.warmup, clock=clock)
    same_tokens = tokens[0].as_lists() == tokens[1].as_lists()
    table = format_table([train, decode], ours="TP=1 path", theirs="plain path")
    print(table)
    print(f"training losses: TP=1 {losses[0]:.6f}, plain {losses[1]:.6f}; greedy tokens identical: {same_tokens}")
    return {"table": table, "logits_max_diff": diff, "loss": losses, "same_tokens": same_tokens,
            "measurements": [train, decode]}


if __name__ == "__main__":
    main()
