"""Sharded checkpoint directories as Lightning's ModelParallelStrategy writes them (torch
``distributed.checkpoint`` shards + ``meta.pt``), and the same directory made hostile: its
``.metadata`` pickle still describes the real shards but also carries an object whose
``__reduce__`` creates a file, which plain ``pickle.load`` would do."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from llama2_lightning.config import LlamaConfig
from llama2_lightning.model import Transformer


class _CreatesFile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        # os.open(marker, O_CREAT | O_WRONLY): one call, no shell, and the file is the evidence.
        return os.open, (str(self.marker), os.O_CREAT | os.O_WRONLY, 0o644)


def write_sharded(directory: Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is not initialized": single-process save
        dcp.save({"state_dict": state_dict}, checkpoint_id=str(directory))
    torch.save(meta, directory / "meta.pt")
    return directory


def sharded_lm(directory: Path, config: LlamaConfig) -> Path:
    """A PretrainModule-style sharded checkpoint of a random ``Transformer(config)``."""
    torch.manual_seed(0)
    weights = {f"model.{k}": v for k, v in Transformer(config).state_dict().items()}
    return write_sharded(directory, weights, {"llama_config": config.to_dict(), "epoch": 0, "global_step": 1})


def sharded_rm(directory: Path, config: LlamaConfig) -> Path:
    """A RewardModule-style sharded checkpoint: trunk under ``model.trunk.``, head ``model.head.score.weight``."""
    torch.manual_seed(0)
    trunk = {f"model.trunk.{k}": v for k, v in Transformer(config).state_dict().items() if k != "output.weight"}
    trunk["model.head.score.weight"] = torch.randn(1, config.dim)
    meta = {"llama_config": config.to_dict(), "reward_model": {"trunk_prefix": "model.trunk.",
            "head_key": "model.head.score.weight", "pad_id": 0, "tokenizer_path": None}}
    return write_sharded(directory, trunk, meta)


def make_hostile(directory: Path, marker: Path) -> Path:
    """Rewrite ``.metadata`` so that unpickling it creates ``marker``."""
    metadata = pickle.loads((directory / ".metadata").read_bytes())
    metadata.planner_data["x"] = _CreatesFile(marker)
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))
    return directory
