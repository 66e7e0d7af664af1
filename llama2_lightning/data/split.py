"""Held-out splits chosen by content, not by position.

A record is held out when the hash of ``(seed, its content)`` is among the ``n_val`` smallest of
its source. The choice therefore depends only on the record itself, the seed and the share: two
configs that list the same file in a different order, or that tokenise the same file in another
data module, hold out the same records, so evaluating one stage's model on another stage's
held-out set never scores a record that model was trained on. With equal seeds, a smaller
``val_fraction`` holds out a subset of a larger one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence


def content_rank(key: Hashable, seed: int) -> bytes:
    """A stable, seed-dependent pseudo-random rank of a record (``repr`` of its content key)."""
    return hashlib.blake2b(repr(key).encode("utf-8"), digest_size=16, key=str(seed).encode()).digest()


def heldout_count(n: int, val_fraction: float) -> int:
    """How many of ``n`` distinct records to hold out: ``round(n * val_fraction)``, at least one and
    leaving at least one for training (none when ``val_fraction`` is 0 or ``n < 2``)."""
    if val_fraction <= 0 or n < 2:
        return 0
    return min(max(1, round(n * val_fraction)), n - 1)


def heldout_keys(keys: Sequence[Hashable], val_fraction: float, seed: int) -> set[Hashable]:
    """The distinct ``keys`` to hold out: the ``heldout_count`` with the smallest ``content_rank``."""
    distinct = list(dict.fromkeys(keys))
    n_val = heldout_count(len(distinct), val_fraction)
    return set(sorted(distinct, key=lambda k: content_rank(k, seed))[:n_val])


__all__ = ["content_rank", "heldout_count", "heldout_keys"]
