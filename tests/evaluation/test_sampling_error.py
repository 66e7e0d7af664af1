"""The binomial standard error the report prints beside rates judged against fixed bars."""

from __future__ import annotations

import math
import random

import pytest

from llama2_lightning.evaluation.sampling_error import binomial_standard_error


def test_known_values() -> None:
    assert binomial_standard_error(0.5, 100) == pytest.approx(0.05)
    assert binomial_standard_error(0.0, 10) == 0.0
    assert binomial_standard_error(0.25, 72) == pytest.approx(math.sqrt(0.25 * 0.75 / 72))


def test_matches_the_spread_of_simulated_rates() -> None:
    # independent check: the standard deviation of many simulated rates of n coin flips with bias p
    rng = random.Random(0)
    p, n = 0.3, 127
    rates = [sum(rng.random() < p for _ in range(n)) / n for _ in range(4000)]
    mean = sum(rates) / len(rates)
    spread = math.sqrt(sum((r - mean) ** 2 for r in rates) / (len(rates) - 1))
    assert spread == pytest.approx(binomial_standard_error(p, n), rel=0.05)


@pytest.mark.parametrize(("rate", "n", "message"), [(0.5, 0, "at least one item"), (1.5, 10, r"\[0, 1\]"),
                                                    (-0.1, 10, r"\[0, 1\]")])
def test_rejects_impossible_input(rate: float, n: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        binomial_standard_error(rate, n)
