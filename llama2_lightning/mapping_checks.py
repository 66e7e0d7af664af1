"""One check for every list-of-mappings a user writes (data ``sources``, pipeline ``stages``): each entry is a
mapping whose keys are all known, or an error that says where and what is allowed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def check_entry(entry: object, where: str, allowed: Sequence[str], expected: str,
                error: type[Exception] = ValueError) -> Mapping[str, Any]:
    """``entry`` if it is a mapping whose keys are all in ``allowed``; else ``error`` naming ``where``:
    "<where> must be <expected>, got ..." or "<where>: unknown key(s) [...]; allowed keys: ..."."""
    if not isinstance(entry, Mapping):
        raise error(f"{where} must be {expected}, got {entry!r}")
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        raise error(f"{where}: unknown key(s) {unknown}; allowed keys: {', '.join(allowed)}")
    return entry
