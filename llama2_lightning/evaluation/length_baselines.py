"""What a reward model must beat: the accuracy of "the longer answer wins" and "the shorter answer wins" on the
same preference pairs. A reward model at its length baseline has learned length, not preference."""

from __future__ import annotations

from collections.abc import Sequence


def length_baselines(chosen_lengths: Sequence[int], rejected_lengths: Sequence[int]) -> dict[str, float]:
    """``{"longer_wins": a, "shorter_wins": b}``: the share of pairs each rule ranks correctly. A tie in
    length counts half for each rule (a coin flip), so the two add up to 1."""
    if len(chosen_lengths) != len(rejected_lengths):
        raise ValueError(f"{len(chosen_lengths)} chosen lengths but {len(rejected_lengths)} rejected lengths")
    if not chosen_lengths:
        raise ValueError("no pairs: length baselines of nothing are undefined")
    longer = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen_lengths, rejected_lengths))
    n = len(chosen_lengths)
    return {"longer_wins": longer / n, "shorter_wins": 1.0 - longer / n}


def pairwise_accuracy(chosen_scores: Sequence[float], rejected_scores: Sequence[float]) -> float:
    """The share of pairs whose chosen answer scores higher (a tie counts half, as for the baselines)."""
    if len(chosen_scores) != len(rejected_scores) or not chosen_scores:
        raise ValueError(f"need equally many chosen and rejected scores, got {len(chosen_scores)} and "
                         f"{len(rejected_scores)}")
    wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen_scores, rejected_scores))
    return wins / len(chosen_scores)
