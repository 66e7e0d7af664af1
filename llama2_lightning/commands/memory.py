"""``llama2-lightning memory --config CONFIG --world-size N [--gpu-memory-gib G]``: will a config fit?

Builds every model of the config's stage on the meta device, shards it with the training code's own
plan over N simulated ranks (torch's fake process group: no processes, no memory) and prints rank 0's
bytes per component (:mod:`llama2_lightning.memory_estimate`). The last stdout line is JSON:
``{"per_rank_gib": x, "fits": true|false|null, "components": {...}, ...}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from llama2_lightning.memory_estimate import estimate, format_table, plan_from_config, summary


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama2-lightning memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, required=True, help="a LightningCLI YAML from configs/")
    p.add_argument("--world-size", type=int, default=None,
                   help="ranks to simulate (default: the config's data_parallel_size, else devices x num_nodes)")
    p.add_argument("--gpu-memory-gib", type=float, default=None, help="memory of one GPU, to answer 'fits?'")
    p.add_argument("--rollout-batch-size", type=int, default=None,
                   help="override model.init_args.rollout_batch_size (rows decoded at once per rank)")
    return p


def _world_size(config: dict, given: int | None) -> int:
    if given is not None:
        return given
    trainer = config.get("trainer") or {}
    strategy = trainer.get("strategy")
    if isinstance(strategy, dict):
        dp = (strategy.get("init_args") or {}).get("data_parallel_size")
        if isinstance(dp, int):
            return dp
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    return (devices if isinstance(devices, int) else 1) * (nodes if isinstance(nodes, int) else 1)


def cli_memory(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = yaml.safe_load(args.config.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SystemExit(f"{args.config}: cannot read the config ({err})") from None
    if not isinstance(config, dict):
        raise SystemExit(f"{args.config}: expected a YAML mapping (trainer:, model:, data:)")
    world = _world_size(config, args.world_size)
    if world < 1:
        raise SystemExit(f"--world-size must be >= 1, got {world}")
    if args.rollout_batch_size is not None:
        model = config.setdefault("model", {})
        model.setdefault("init_args", {})["rollout_batch_size"] = args.rollout_batch_size
    try:
        plan = plan_from_config(config, world)
    except ValueError as err:
        raise SystemExit(f"{args.config}: {err}") from None
    est = estimate(plan, args.gpu_memory_gib)
    print(format_table(plan, est))
    print(json.dumps(summary(est)))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_memory())
