"""How a ``fit`` ended, written where a scheduler and the pipeline can read it.

Lightning turns SIGTERM (what SLURM sends before preempting a job) into ``SIGTERMException``, a
``SystemExit`` whose status is 0, so a terminated run looked finished. This callback saves a
resumable ``last.ckpt`` when that happens, and writes ``<default_root_dir>/fit-status.json``:
``{"completed": true}`` only when ``fit`` returned with its loop done (``max_steps``, ``max_epochs``,
``max_time`` or a callback's ``should_stop``, possibly reached before a resume); a SIGTERM
writes ``{"completed": false, "reason": "sigterm", "checkpoint": ...}``. The ``fit`` command then
exits 143 (the shell's status for SIGTERM).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from llama2_lightning.fit_status import status_path, write_status


class RunStatus(L.Callback):
    """Save on SIGTERM and record whether training reached its end (module docstring)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            # A status left by an earlier fit in this directory says nothing about this one.
            status_path(trainer.default_root_dir).unlink(missing_ok=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Called when fit returns normally, also when it resumed a checkpoint that had already reached
        # its end (Lightning then skips the loop and on_train_end); `done` says whether the end was reached.
        if trainer.is_global_zero:
            completed = bool(trainer.fit_loop.done) or trainer.limit_train_batches == 0
            write_status(trainer.default_root_dir, {"completed": completed, "global_step": trainer.global_step,
                                                     "epoch": trainer.current_epoch})

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return  # a crash or Ctrl-C may stop mid-step: its state is not a consistent checkpoint
        # Lightning raises SIGTERMException between batches, so the state is consistent here; every rank
        # takes part in the save (a sharded checkpoint is written by all of them).
        path = _last_checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # everything a resume needs
        if trainer.is_global_zero:
            write_status(trainer.default_root_dir, {"completed": False, "reason": "sigterm",
                                                     "global_step": trainer.global_step, "checkpoint": str(path)})


def _last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where the run's ModelCheckpoint keeps ``last.ckpt`` (so a resume finds it), else ``<root>/checkpoints``."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            return Path(cb.dirpath) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
