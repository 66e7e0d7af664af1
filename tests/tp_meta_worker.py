"""One rank of the Meta-shards test (``tests/test_tensor_parallel.py``), launched by
``torch.distributed.run`` on CPU with gloo: builds the tiny model split ``--tp`` ways from a Meta
directory of as many ``consolidated.NN.pth`` shards, as the stages do (``build_transformer``), and
writes its logits and, for every weight, which shard files its block was read from.

    python -m torch.distributed.run --nproc-per-node=2 tests/tp_meta_worker.py WORK_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from llama2_lightning.checkpoint import read_config
from llama2_lightning.checkpoint.meta_shards import MetaShards, MetaWeight
from llama2_lightning.modules.common import build_transformer

READS: dict[str, set[int]] = {}
_active: list[set[int]] = []
_tensor, _getitem = MetaShards.tensor, MetaWeight.__getitem__


def _recorded_tensor(self: MetaShards, shard: int, name: str) -> torch.Tensor:
    if _active:
        _active[-1].add(shard)
    return _tensor(self, shard, name)


def _recorded_getitem(self: MetaWeight, block: tuple[slice, ...]) -> torch.Tensor:
    _active.append(READS.setdefault(self.name, set()))
    try:
        return _getitem(self, block)
    finally:
        _active.pop()


def main(work: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("data_parallel", "tensor_parallel"))
    MetaShards.tensor, MetaWeight.__getitem__ = _recorded_tensor, _recorded_getitem
    model = build_transformer(read_config(work / "meta"), str(work / "meta"), device_mesh=mesh)
    MetaShards.tensor, MetaWeight.__getitem__ = _tensor, _getitem
    tokens = torch.load(work / "tokens.pt", weights_only=True)
    with torch.no_grad():
        logits = model(tokens)  # (B, T, V), gathered over the vocabulary
    torch.save(logits, work / f"logits{rank}.pt")
    (work / f"reads{rank}.json").write_text(json.dumps({k: sorted(v) for k, v in READS.items()}))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]))
