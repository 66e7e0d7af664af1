"""The smallest `fit` config that exercises the real stack: the `tiny` preset on a few windows of
the shipped corpus, CSV logs only, a checkpoint every step (step{N}.ckpt and last.ckpt)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def small_corpus(directory: Path) -> Path:
    """The first 20,000 characters of the shipped corpus: tokenised in well under a second."""
    path = directory / "corpus.txt"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text((ROOT / "data" / "tinyshakespeare.txt").read_text()[:20_000])
    return path


def tiny_fit_config(root: Path, max_steps: int = 4, callbacks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """``root`` is the run directory; the corpus and token cache go beside it."""
    return {
        "seed_everything": 1,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": max_steps,
            "limit_val_batches": 0, "enable_progress_bar": False, "enable_model_summary": False,
            "default_root_dir": str(root),
            "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                        "init_args": {"save_dir": "${trainer.default_root_dir}", "name": "csv"}}],
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": "${trainer.default_root_dir}/checkpoints", "filename": "step{step}",
                                         "auto_insert_metric_name": False, "every_n_train_steps": 1,
                                         "save_last": True, "save_top_k": -1}},
                          *(callbacks or [])],
            "plugins": [{"class_path": "llama2_lightning.checkpoint_io.AtomicCheckpointIO"}],
        },
        "model": {"class_path": "llama2_lightning.modules.PretrainModule",
                  "init_args": {"model": "tiny", "model_overrides": {"max_seq_len": 32}}},
        "data": {"class_path": "llama2_lightning.data.PretrainDataModule",
                 "init_args": {"train_files": str(small_corpus(root.parent)),
                               "tokenizer_path": str(ROOT / "data" / "tokenizer.model"), "max_seq_len": 32,
                               "batch_size": 2, "val_fraction": 0.05, "cache_dir": str(root.parent / "cache")}},
    }


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
