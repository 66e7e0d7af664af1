"""Does the model keep a system instruction across turns? The paper's Figure 9-10 question (section 3.3) as
numbers: the instruction is given once, in the system turn, and each answer is checked by program."""

from __future__ import annotations

from collections.abc import Sequence

from llama2_lightning.chat import Message
from llama2_lightning.evaluation.answering import Answerer
from llama2_lightning.evaluation.instructions import adherence_by_turn, instruction


def multi_turn_answers(answer: Answerer, system: str, user_turns: Sequence[Sequence[str]]) -> list[list[str]]:
    """Answer each dialog turn by turn, all dialogs together: turn ``t``'s prompt holds the system message,
    the earlier user turns and the model's own earlier answers (dialogs may have different lengths)."""
    contexts: list[list[Message]] = [[{"role": "system", "content": system}] for _ in user_turns]
    answers: list[list[str]] = [[] for _ in user_turns]
    for t in range(max((len(u) for u in user_turns), default=0)):
        live = [i for i, u in enumerate(user_turns) if len(u) > t]
        for i in live:
            contexts[i].append({"role": "user", "content": user_turns[i][t]})
        texts = answer([contexts[i] for i in live])
        for i, text in zip(live, texts, strict=True):
            contexts[i].append({"role": "assistant", "content": text})
            answers[i].append(text)
    return answers


def gatt_adherence(answer: Answerer, instruction_name: str, user_turns: Sequence[Sequence[str]]
                   ) -> list[tuple[float, int]]:
    """(share of answers following the instruction, answers) at each turn, the instruction given only as
    the system message of every dialog."""
    item = instruction(instruction_name)
    return adherence_by_turn(item.name, multi_turn_answers(answer, item.text, user_turns))
