"""One rank of the host-memory test in ``test_shard_loading.py`` (run with RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT set):

    python tests/rss_run.py save DIR   # random weights, saved as a sharded (DCP) Lightning checkpoint
    python tests/rss_run.py load DIR   # build on meta, shard, load this rank's shards; print JSON

``load`` prints ``{"rank", "before_kib", "after_kib", "local_bytes", "model_bytes"}``: peak resident set
size (``resource.getrusage``) before and after ``build_transformer``.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh

from llama2_lightning.config import LlamaConfig
from llama2_lightning.distributed import local_numel
from llama2_lightning.modules.common import build_transformer


def peak_rss_kib(reset: bool = False) -> int:
    """This process's peak resident set size. ``getrusage``'s ``ru_maxrss`` survives fork and exec, so a child
    of a large pytest process starts with the parent's peak; Linux's ``VmHWM`` can be reset to the current
    size first (``clear_refs`` 5). Falls back to ``getrusage`` where ``/proc`` lacks it."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    line = next(ln for ln in status.read_text().splitlines() if ln.startswith("VmHWM:"))
    return int(line.split()[1])

# ~168M parameters: 672 MB in float32
CONFIG = LlamaConfig(dim=1024, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=32000, multiple_of=256,
                     max_seq_len=256)


def main(mode: str, directory: str) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("data_parallel",))
    path = Path(directory)
    if mode == "save":
        model = build_transformer(CONFIG, None, device_mesh=mesh)
        dcp.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, checkpoint_id=str(path))
        if dist.get_rank() == 0:
            torch.save({"llama_config": CONFIG.to_dict(), "global_step": 0}, path / "meta.pt")
    else:
        before = peak_rss_kib(reset=True)
        model = build_transformer(CONFIG, str(path), device_mesh=mesh, param_dtype="bfloat16")
        after = peak_rss_kib()
        print(json.dumps({"rank": dist.get_rank(), "before_kib": before, "after_kib": after,
                          "local_bytes": local_numel(model) * 4, "model_bytes": model.num_parameters() * 4}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2])
