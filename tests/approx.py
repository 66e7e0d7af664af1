"""Assertion helpers shared by the test files (tests/ is on the path; see pyproject's pytest options)."""

from __future__ import annotations

import torch

T, F_ = True, False  # short mask literals


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    """``actual`` equals ``expected`` (a nested list or tensor) to ``atol``, in ``actual``'s dtype."""
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)
