"""What every data module shares: a tokenizer loaded on first use, and the checks of the constructor
arguments they have in common. Errors name the argument and what was expected."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L

from llama2_lightning.chat_template import LLAMA2_FORMAT, ChatTemplate, resolve_chat_template
from llama2_lightning.tokenizer import Tokenizer, resolve_tokenizer_path


class TokenizedDataModule(L.LightningDataModule):
    """A data module that encodes with the tokenizer at ``self.tokenizer_path``, loaded at first use:
    building a module from a config reads no file. Checks and keeps the arguments every data module
    has; ``allow_zero_val``: whether other held-out data may stand in for ``val_fraction = 0``."""
    def __init__(self, tokenizer_path: str, batch_size: int, val_fraction: float, seed: int, num_workers: int, *,
                 allow_zero_val: bool) -> None:
        super().__init__()
        check_ints(("batch_size", batch_size, 1), ("num_workers", num_workers, 0))
        check_val_fraction(val_fraction, allow_zero=allow_zero_val)
        self.tokenizer_path = tokenizer_path
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self._tokenizer: Tokenizer | None = None
        # Dialog modules set it from their `chat_template` argument: "llama2", "model" or a .jinja file.
        self.chat_template: str = LLAMA2_FORMAT
        self._template: tuple[ChatTemplate | None] | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.tokenizer_path)
        return self._tokenizer

    def use_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Encode with ``tokenizer``, already loaded from ``tokenizer_path`` (a GGUF vocabulary takes seconds
        to read; a command that has one should not read it twice)."""
        if tokenizer.model_path.resolve() != resolve_tokenizer_path(self.tokenizer_path).resolve():
            raise ValueError(f"use_tokenizer: the tokenizer was loaded from {tokenizer.model_path}, but tokenizer_path "
                             f"is {self.tokenizer_path}")
        self._tokenizer = tokenizer

    @property
    def template(self) -> ChatTemplate | None:
        """The chat template ``chat_template`` names, resolved at first use; ``None``: the Llama 2 format."""
        if self._template is None:
            self._template = (resolve_chat_template(self.chat_template, self.tokenizer),)
        return self._template[0]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def replicas(self) -> tuple[int, int]:
        """(number of data-parallel replicas, this rank's index among them): the strategy's data-parallel
        world, not the global one (under tensor parallelism several ranks share one data shard), exactly
        what Lightning would give its own DistributedSampler; (1, 0) without a trainer."""
        kwargs = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        if not kwargs:
            return 1, 0
        return int(kwargs["num_replicas"]), int(kwargs["rank"])



class SourcedDataModule(TokenizedDataModule):
    """A data module over named ``sources`` plus held-out-only ``val_source_specs``: a batch's ``source``
    ids index :attr:`source_names`."""

    sources: Sequence[Any]
    val_source_specs: Sequence[Any]

    @property
    def source_names(self) -> list[str]:
        """Names for the batch's ``source`` ids: training sources, then validation-only ones."""
        return [s.name for s in (*self.sources, *self.val_source_specs)]


def check_ints(*args: tuple[str, Any, int]) -> None:
    """Each ``(name, value, low)``: ``value`` must be an integer (not a bool) >= ``low``."""
    for name, value, low in args:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be {' or '.join(repr(a) for a in allowed)}, got {value!r}")


def check_val_fraction(value: float, allow_zero: bool) -> None:
    """The share of the data held out: in [0, 1) where other held-out data may stand in, else (0, 1)."""
    if allow_zero and not 0.0 <= value < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {value}")
    if not allow_zero and not 0.0 < value < 1.0:
        raise ValueError(f"val_fraction must be in the open interval (0, 1), got {value}")
