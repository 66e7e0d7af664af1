"""A callback for the pretraining tests: records each rank's parameter share and per-step losses to
JSON. Importable as ``recorder`` when ``tests/`` is on sys.path (pytest puts it there; the FSDP test's
subprocess gets it through PYTHONPATH)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L

from llama2_lightning.distributed import is_sharded, local_numel


class Recorder(L.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "sharded": is_sharded(pl_module.model),
            "local_numel": local_numel(pl_module.model),
            "total_numel": pl_module.model.num_parameters(),
            "losses": self.losses,
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class Interrupted(RuntimeError):
    pass


class Interrupt(L.Callback):
    """Stands in for a crash: raises before training step ``at_step + 1`` begins, after the
    checkpoint of step ``at_step`` has been written."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            raise Interrupted(f"interrupted at step {self.at_step}")
