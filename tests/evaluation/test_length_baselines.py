"""Length baselines and pairwise accuracy (llama2_lightning.evaluation.length_baselines) by hand."""

from __future__ import annotations

import pytest

from llama2_lightning.evaluation.length_baselines import length_baselines, pairwise_accuracy


def test_length_baselines_by_hand() -> None:
    # chosen longer, shorter, equal, longer
    out = length_baselines([10, 3, 5, 9], [4, 8, 5, 1])
    assert out == {"longer_wins": pytest.approx(2.5 / 4), "shorter_wins": pytest.approx(1.5 / 4)}


def test_pairwise_accuracy_by_hand_and_errors() -> None:
    assert pairwise_accuracy([1.0, 0.0, 2.0], [0.0, 1.0, 2.0]) == pytest.approx(1.5 / 3)
    with pytest.raises(ValueError, match="no pairs"):
        length_baselines([], [])
    with pytest.raises(ValueError, match="2 chosen lengths but 1"):
        length_baselines([1, 2], [1])
