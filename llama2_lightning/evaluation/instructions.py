"""System instructions a program can check, for measuring whether a model keeps following one across turns
(the paper's Ghost Attention, section 3.3, Figures 9-10, as numbers instead of attention maps).

Each :class:`CheckableInstruction` is a system-prompt text and a pure function of an answer. The checks are
deliberately literal: an answer that mostly follows the instruction fails it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CheckableInstruction:
    name: str
    text: str  # the system prompt
    check: Callable[[str], bool]  # does this answer follow it?


def _letters(answer: str) -> list[str]:
    return [c for c in answer if c.isalpha()]


def all_capitals(answer: str) -> bool:
    """Every letter is upper case, and there is at least one letter."""
    letters = _letters(answer)
    return bool(letters) and all(c.isupper() for c in letters)


def ends_with_word(word: str) -> Callable[[str], bool]:
    """The answer's last word is ``word`` (case-insensitive; trailing punctuation ignored)."""
    target = word.lower()

    def check(answer: str) -> bool:
        words = re.findall(r"[\w']+", answer.lower())
        return bool(words) and words[-1] == target

    return check


def never_letter(letter: str) -> Callable[[str], bool]:
    """The letter never appears, in either case, and the answer is not empty."""
    banned = letter.lower()

    def check(answer: str) -> bool:
        return bool(answer.strip()) and banned not in answer.lower()

    return check


def at_most_words(n: int) -> Callable[[str], bool]:
    """Between 1 and ``n`` words."""

    def check(answer: str) -> bool:
        return 1 <= len(answer.split()) <= n

    return check


INSTRUCTIONS: tuple[CheckableInstruction, ...] = (
    CheckableInstruction("capitals", "Answer only in capital letters.", all_capitals),
    CheckableInstruction("ahoy", "End every answer with the word 'Ahoy'.", ends_with_word("ahoy")),
    CheckableInstruction("no_e", "Never use the letter e in your answers.", never_letter("e")),
    CheckableInstruction("short", "Answer in at most 15 words.", at_most_words(15)),
)


def instruction(name: str) -> CheckableInstruction:
    for item in INSTRUCTIONS:
        if item.name == name:
            return item
    raise ValueError(f"unknown checkable instruction {name!r}; known: {', '.join(i.name for i in INSTRUCTIONS)}")


def adherence_by_turn(instruction_name: str, dialogs: Sequence[Sequence[str]]) -> list[tuple[float, int]]:
    """For each turn index, (share of answers at that turn that follow the instruction, number of answers);
    ``dialogs`` holds each dialog's answers in turn order (dialogs may differ in length)."""
    check = instruction(instruction_name).check
    turns = max((len(d) for d in dialogs), default=0)
    out = []
    for t in range(turns):
        answers = [d[t] for d in dialogs if len(d) > t]
        out.append((sum(check(a) for a in answers) / len(answers), len(answers)))
    return out


def late_turn_adherence(mean_by_turn: Sequence[float | None]) -> float | None:
    """Mean adherence over turns 3 and later (GAtt's claim is about the turns after the instruction fades
    from view; the paper's Figures 9-10), skipping turns no dialog reached; None when there are none."""
    late = [v for v in mean_by_turn[2:] if v is not None]
    return sum(late) / len(late) if late else None
