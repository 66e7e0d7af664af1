"""Turn-by-turn adherence to a system instruction (llama2_lightning.evaluation.gatt_adherence) with a scripted
model that forgets the instruction after two turns."""

from __future__ import annotations

from collections.abc import Sequence

from llama2_lightning.chat import Message
from llama2_lightning.evaluation.gatt_adherence import gatt_adherence, multi_turn_answers


def test_a_model_that_forgets_after_two_turns() -> None:
    seen: list[list[Message]] = []

    def forgetful(dialogs: Sequence[Sequence[Message]]) -> list[str]:
        seen.extend(list(d) for d in dialogs)
        users = [sum(m["role"] == "user" for m in d) for d in dialogs]
        return ["I REMEMBER." if n <= 2 else "i forgot." for n in users]

    turns = [["a", "b", "c", "d", "e"], ["a", "b", "c"], ["a"]]
    assert gatt_adherence(forgetful, "capitals", turns) == [(1.0, 3), (1.0, 2), (0.0, 2), (0.0, 1), (0.0, 1)]
    # The instruction is only the system message; each later prompt carries the model's own answers.
    assert all(d[0] == {"role": "system", "content": "Answer only in capital letters."} for d in seen)
    fifth = seen[-1]
    assert [m["content"] for m in fifth if m["role"] == "assistant"] == ["I REMEMBER.", "I REMEMBER.", "i forgot.",
                                                                          "i forgot."]
    assert fifth[-1] == {"role": "user", "content": "e"}


def test_multi_turn_answers_keep_dialogs_apart() -> None:
    def echo(dialogs: Sequence[Sequence[Message]]) -> list[str]:
        return ["/".join(m["content"] for m in d if m["role"] == "user") for d in dialogs]

    assert multi_turn_answers(echo, "sys", [["x", "y"], ["p"]]) == [["x", "x/y"], ["p"]]
