"""argparse ``type=`` functions for the sampling options every command shares: a bad value is a
usage error naming the option (``argparse`` adds it), never a torch error from deep inside sampling."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _checked(text: str, parse: Callable[[str], float], expected: str, ok: Callable[[float], bool],
             why: str) -> float:
    """``parse(text)`` if it gives a value ``ok`` accepts; else argparse's usage error: "expected
    <expected>" for text that is not a number at all, "must be <why>" for a number out of range."""
    try:
        value = parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {why}, got {text}")
    return value


def positive_int(text: str) -> int:
    return int(_checked(text, int, "a whole number >= 1", lambda v: v >= 1, ">= 1"))


def temperature(text: str) -> float:
    """A finite number >= 0 (0 samples greedily)."""
    return _checked(text, float, "a number >= 0", lambda v: math.isfinite(v) and v >= 0,
                    "a finite number >= 0 (0 samples greedily)")


def probability_mass(text: str) -> float:
    """A nucleus (top-p) mass in (0, 1]."""
    return _checked(text, float, "a number in (0, 1]", lambda v: 0.0 < v <= 1.0,  # NaN fails both comparisons
                    "in (0, 1] (1 keeps every token)")


__all__ = ["positive_int", "temperature", "probability_mass"]
