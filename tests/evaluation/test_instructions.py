"""The checkable system instructions of llama2_lightning.evaluation.instructions, answer by answer."""

from __future__ import annotations

import pytest

from llama2_lightning.evaluation.instructions import INSTRUCTIONS, adherence_by_turn, instruction

CASES = {
    "capitals": (["PARIS IS THE CAPITAL.", "YES! 42 TIMES."], ["Paris is the capital.", "PARIS is big", "42", ""]),
    "ahoy": (["Land is near, Ahoy!", "ahoy", "We sail at dawn. AHOY."], ["Ahoy, sailor.", "ahoyhoy", ""]),
    "no_e": (["A big cat sat on a mat.", "Paris is a city."], ["The cat.", "EAST", "  "]),
    "short": (["Paris.", " ".join(["word"] * 15)], [" ".join(["word"] * 16), "   "]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_check(name: str) -> None:
    follows, breaks = CASES[name]
    check = instruction(name).check
    assert all(check(a) for a in follows), [a for a in follows if not check(a)]
    assert not any(check(a) for a in breaks), [a for a in breaks if check(a)]


def test_every_instruction_is_covered_and_named_uniquely() -> None:
    assert sorted(i.name for i in INSTRUCTIONS) == sorted(CASES)
    with pytest.raises(ValueError, match="unknown checkable instruction 'pirate'.*capitals"):
        instruction("pirate")


def test_adherence_by_turn_over_uneven_dialogs() -> None:
    dialogs = [["YES", "NO", "maybe"], ["OK", "fine"], ["HELLO"]]
    assert adherence_by_turn("capitals", dialogs) == [(1.0, 3), (0.5, 2), (0.0, 1)]
