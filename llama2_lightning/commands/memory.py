"""``llama2-lightning memory --config CONFIG --world-size N [--gpu-memory-gib G]``: will a config fit?

Builds every model of the config's stage on the meta device, lays it out with the training code's own
plan (the strategy's tensor-parallel split, then FSDP2 over the data-parallel ranks) over N simulated
ranks (torch's fake process group: no processes, no memory) and prints rank 0's bytes per component
(:mod:`llama2_lightning.memory_estimate`). The last stdout line is JSON:
``{"per_rank_gib": x, "fits": true|false|null, "components": {...}, ...}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from llama2_lightning.memory_estimate import estimate, format_table, parallel_layout, plan_from_config, summary


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama2-lightning memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, required=True, help="a LightningCLI YAML from configs/")
    p.add_argument("--world-size", type=int, default=None,
                   help="ranks to simulate (default: the strategy's data_parallel_size x tensor_parallel_size, "
                        "else devices x num_nodes); the config's tensor_parallel_size is kept")
    p.add_argument("--gpu-memory-gib", type=float, default=None, help="memory of one GPU, to answer 'fits?'")
    p.add_argument("--rollout-batch-size", type=int, default=None,
                   help="override model.init_args.rollout_batch_size (rows decoded at once per rank)")
    return p


def cli_memory(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = yaml.safe_load(args.config.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SystemExit(f"{args.config}: cannot read the config ({err})") from None
    if not isinstance(config, dict):
        raise SystemExit(f"{args.config}: expected a YAML mapping (trainer:, model:, data:)")
    if args.world_size is not None and args.world_size < 1:
        raise SystemExit(f"--world-size must be >= 1, got {args.world_size}")
    if args.rollout_batch_size is not None:
        model = config.setdefault("model", {})
        model.setdefault("init_args", {})["rollout_batch_size"] = args.rollout_batch_size
    try:
        world, tp = parallel_layout(config, args.world_size)
        plan = plan_from_config(config, world, tp)
    except ValueError as err:
        raise SystemExit(f"{args.config}: {err}") from None
    est = estimate(plan, args.gpu_memory_gib)
    print(format_table(plan, est))
    print(json.dumps(summary(est, plan)))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_memory())
