"""One rank of the tensor-parallel parity tests (``tests/test_tensor_parallel.py``), launched by
``torch.distributed.run`` on CPU with gloo: reads the unsharded weights and inputs the test wrote,
runs them through the model split ``--tp`` ways (FSDP2 over the rest of the processes), and writes
what it computed for the test to compare with the unsharded model."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from llama2_lightning.config import LlamaConfig
from llama2_lightning.distributed import gathered, shard_transformer
from llama2_lightning.generation import generate
from llama2_lightning.model import Transformer
from llama2_lightning.scalar_model import ScalarModel
from llama2_lightning.tensor_parallel import (
    cross_entropy,
    loss_backward_context,
    parallelize_scalar_model,
    parallelize_transformer,
    vocab_argmax,
)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--tp", type=int, default=2)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world // args.tp, args.tp), mesh_dim_names=("data_parallel", "tensor_parallel"))
    case = torch.load(args.work_dir / "case.pt", weights_only=True)
    config = LlamaConfig.from_dict(case["config"])
    model = Transformer(config)
    model.load_state_dict(case["state_dict"])
    parallelize_transformer(model, mesh)
    if world > args.tp:
        shard_transformer(model, mesh)
    out: dict[str, object] = {}
    x, y = case["tokens"], case["targets"]  # (B, T) each, the same on every rank
    dp_rank, dp_size = mesh["data_parallel"].get_local_rank(), world // args.tp
    rows = slice(dp_rank * x.size(0) // dp_size, (dp_rank + 1) * x.size(0) // dp_size)  # this replica's batch

    with torch.no_grad():
        out["logits"] = model(x[rows])  # (B/dp, T, V), gathered
        sharded = model(x[rows], sharded_logits=True)  # (B/dp, T, V/tp) per rank
        out["argmax"] = vocab_argmax(sharded)
        out["nll_sum"] = cross_entropy(sharded.flatten(0, 1), y[rows].flatten(), reduction="sum")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(2):
        loss = cross_entropy(model(x[rows], sharded_logits=True).flatten(0, 1), y[rows].flatten())
        with loss_backward_context(model):
            loss.backward()
        out[f"loss{step}"] = loss.detach()
        if step == 0:
            out["grads"] = {n: _full(p.grad) for n, p in model.named_parameters()}
            out["local_numel"] = sum(p.to_local().numel() for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad()
    out["weights_after_step"] = {n: _full(p.detach()) for n, p in model.named_parameters()}
    prompts = case["prompts"]
    with gathered(model):
        model.setup_kv_cache(1, 8)
        out["cache_shape"] = tuple(model.layers[0].attention.kv_cache.k.shape)  # (B, G/tp, S, D)
        model.reset_kv_cache()
        out["greedy"] = generate(model, prompts, 8, temperature=0.0).tokens
        # each rank draws with its own seed; the TP group must still agree on one sample per step
        out["sampled"] = generate(model, prompts, 8, temperature=1.0, seed=rank).tokens
    scalar = ScalarModel.from_transformer(Transformer(config), drop_lm_head=True)
    scalar.load_state_dict(case["scalar_state_dict"])
    parallelize_scalar_model(scalar, mesh)
    with torch.no_grad():
        out["scores"] = scalar(x, case["attention_mask"])  # (B,)
    torch.save(out, args.work_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
