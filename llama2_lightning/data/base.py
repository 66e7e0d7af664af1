"""What every data module shares: a tokenizer loaded on first use, and the checks of the constructor
arguments they have in common. Errors name the argument and what was expected."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L

from llama2_lightning.tokenizer import Tokenizer


class TokenizedDataModule(L.LightningDataModule):
    """A data module that encodes with the SentencePiece model at ``self.tokenizer_path``, loaded at
    first use: building a module from a config reads no file."""

    tokenizer_path: str
    _tokenizer: Tokenizer | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.tokenizer_path)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


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
