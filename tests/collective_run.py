"""One rank of ``test_global_stats.py``'s 2-process run (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set).

Prints one JSON line: this rank's whitened rows (to compare with one process whitening them all), the
number of lockstep micro-batches it trained on an uneven pool, and its greedy samples from a sharded,
ungathered policy (to compare with the unsharded model's)."""

from __future__ import annotations

import copy
import json
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from llama2_lightning.distributed import gathered, shard_transformer
from llama2_lightning.generation import generate
from llama2_lightning.model import Transformer
from llama2_lightning.rlhf.global_stats import global_masked_whiten, global_whiten_rewards, lockstep_batches

# rank 0 holds rows 0-2, rank 1 rows 3-9: an uneven split of one global batch
SPLIT = {0: slice(0, 3), 1: slice(3, 10)}


def global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(10, generator=g) * 3 + 1  # (10,)
    adv = torch.randn(10, 6, generator=g)  # (10, T)
    mask = torch.rand(10, 6, generator=g) > 0.3  # (10, T)
    return rewards, adv, mask


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    rows = SPLIT[rank]
    rewards, adv, mask = global_batch()
    out = {"rank": rank,
           "rewards": global_whiten_rewards(rewards[rows], shift_mean=False).tolist(),
           "advantages": global_masked_whiten(adv[rows], mask[rows]).tolist()}

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",))
    torch.manual_seed(0)
    ref = Transformer.from_name("tiny")
    model = shard_transformer(copy.deepcopy(ref), mesh, "bfloat16", "float32")
    model.activation_checkpointing = True
    pool = [torch.randint(0, 2048, (12,)) for _ in range(3 if rank == 0 else 7)]  # uneven pools
    steps = 0
    for batch, weight in lockstep_batches(pool, batch_size=2):
        loss = model(torch.stack(batch)).float().logsumexp(-1).mean() * weight
        loss.backward()  # reduce-scatters the gradients: a collective every rank must join
        steps += 1
    out["train_steps"] = steps

    model.zero_grad(set_to_none=True)
    prompts = [[1, 5, 9, 2], [7, 7]] if rank == 0 else [[3, 4, 5], [8], [9, 9, 9, 9, 9], [1, 2]]
    unsharded = copy.deepcopy(ref).to(torch.bfloat16)
    first = generate(unsharded, prompts[:1], 1, temperature=0.0).tokens[0, 0].item()
    eos = first if rank == 0 else None  # rank 0's first row ends at once, rank 1's run to the limit
    with gathered(model, budget_bytes=0) as whole:  # too big to gather: decodes sharded, in lockstep
        samples = generate(model, prompts, 10, temperature=0.0, eos_id=eos, batch_size=None if rank == 0 else 1)
    out["gathered"] = whole
    out["samples"] = samples.as_lists()
    out["expected"] = generate(unsharded, prompts, 10, temperature=0.0, eos_id=eos).as_lists()
    print(json.dumps(out), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
