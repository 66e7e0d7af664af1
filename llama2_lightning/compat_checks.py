"""Checks, before a ``fit`` starts, that the model, the data and the checkpoints it starts from
agree; each mismatch would otherwise surface deep inside torch (``IndexError: index out of range
in self`` from the embedding or the RoPE table) or, for a swapped tokenizer, not at all.

A Lightning checkpoint written by this package records the SHA-256 of its tokenizer model
(:data:`TOKENIZER_HASH_KEY`, added by :class:`~llama2_lightning.callbacks.TokenizerStamp`); starting
from or resuming such a checkpoint with a different tokenizer is refused unless the run sets
``allow_tokenizer_change: true``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llama2_lightning.checkpoint import detect_format
from llama2_lightning.checkpoint.safe_load import safe_torch_load
from llama2_lightning.config import LlamaConfig

TOKENIZER_HASH_KEY = "tokenizer_sha256"


class CompatibilityError(ValueError):
    """The model, the data and the starting checkpoint do not fit together."""


def _datamodule_tokenizer(datamodule: Any) -> Any:
    return getattr(datamodule, "tokenizer", None) if getattr(datamodule, "tokenizer_path", None) else None


def check_model_and_data(config: LlamaConfig, datamodule: Any, where: str = "model") -> None:
    """The tokenizer's ids must index the embedding; the data's sequences must fit the RoPE table."""
    tokenizer = _datamodule_tokenizer(datamodule)
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise CompatibilityError(
            f"{where}: vocab_size is {config.vocab_size} but the data's tokenizer {datamodule.tokenizer_path} has "
            f"{tokenizer.vocab_size} pieces: set the model's vocab_size >= {tokenizer.vocab_size} "
            "(model_overrides.vocab_size) or use the tokenizer the model was trained with")
    seq = getattr(datamodule, "max_seq_len", None)
    if isinstance(seq, int) and seq > config.max_seq_len:
        raise CompatibilityError(
            f"data max_seq_len={seq} exceeds the {where}'s max_seq_len={config.max_seq_len} (the length of its RoPE "
            "table): lower data.init_args.max_seq_len or raise the model's max_seq_len")


def recorded_tokenizer_hash(path: str | os.PathLike[str]) -> str | None:
    """The tokenizer hash a Lightning checkpoint (file or sharded directory) records, else None
    (other formats, and checkpoints written before the hash was recorded)."""
    path = Path(path)
    if not path.exists() or detect_format(path) != "lightning":
        return None
    ckpt = safe_torch_load(path / "meta.pt" if path.is_dir() else path)
    value = ckpt.get(TOKENIZER_HASH_KEY) if isinstance(ckpt, Mapping) else None
    return value if isinstance(value, str) else None


def check_tokenizer_hash(checkpoint: str | os.PathLike[str], recorded: str | None, datamodule: Any,
                         allow_change: bool, role: str) -> None:
    tokenizer = _datamodule_tokenizer(datamodule)
    if recorded is None or tokenizer is None or tokenizer.content_hash == recorded:
        return
    if allow_change:
        warnings.warn(f"{role} {checkpoint} was trained with another tokenizer than {datamodule.tokenizer_path}; "
                      "continuing because allow_tokenizer_change is true", stacklevel=2)
        return
    raise CompatibilityError(
        f"{role} {checkpoint} was trained with a different tokenizer (sha256 {recorded[:12]}...) than the data's "
        f"{datamodule.tokenizer_path} (sha256 {tokenizer.content_hash[:12]}...): token ids would mean other "
        "pieces. Use the original tokenizer, or set allow_tokenizer_change: true if the change is intended")


def check_fit_start(model: Any, datamodule: Any, ckpt_path: str | None, allow_tokenizer_change: bool = False) -> None:
    """Every check above for a ``fit`` of ``model`` on ``datamodule``: the module's ``config`` against
    the data, and the tokenizer recorded in its ``init_from`` and in ``ckpt_path``."""
    config = getattr(model, "config", None)
    if isinstance(config, LlamaConfig):
        check_model_and_data(config, datamodule, f"{type(model).__name__} model")
    hparams = getattr(model, "hparams", {})
    init_from = hparams.get("init_from") if isinstance(hparams, Mapping) else None
    for role, path in (("init_from", init_from), ("ckpt_path", ckpt_path)):
        if isinstance(path, (str, os.PathLike)) and str(path) not in ("last", "best", "hpc", "registry"):
            check_tokenizer_hash(path, recorded_tokenizer_hash(path), datamodule, allow_tokenizer_change, role)


__all__ = ["CompatibilityError", "TOKENIZER_HASH_KEY", "check_model_and_data", "recorded_tokenizer_hash",
           "check_tokenizer_hash", "check_fit_start"]
