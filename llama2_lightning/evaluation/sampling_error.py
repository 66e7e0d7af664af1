"""How far a rate measured on n items can move by the luck of which n were drawn: the binomial standard error.
The report prints it beside the accuracies and adherence rates it judges against fixed bars, so a gap of a
point or two on a hundred items is read as what it is (unresolved), not as a pass or a fail."""

from __future__ import annotations

import math


def binomial_standard_error(rate: float, n: int) -> float:
    """``sqrt(rate * (1 - rate) / n)``: the standard error of a share ``rate`` of ``n`` independent yes/no
    outcomes. Outcomes that are correlated (several turns of one dialog) make the true error larger, so for
    them this is a lower bound."""
    if n <= 0:
        raise ValueError(f"a standard error needs at least one item, got n={n}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"a rate must lie in [0, 1], got {rate}")
    return math.sqrt(rate * (1.0 - rate) / n)
