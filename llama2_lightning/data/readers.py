"""Parsers from the shipped datasets into chat messages, and a JSONL reader with usable errors.

Anthropic HH-RLHF (helpful-base / harmless-base) text looks like
``"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ..."``. Real records have quirks, handled by
these rules (checked against the 4,000 shipped records):

1. Turns are split only on the exact markers ``"\\n\\nHuman:"`` and ``"\\n\\nAssistant:"`` (a bare
   ``"Human:"`` also counts at the very start of the text, for already-stripped strings). Inline
   look-alikes such as ``"...products.  Human:  Thanks."``, ``"\\n\\nHumans:"`` or
   ``"\\n\\n Human:"`` occur inside model replies (the model hallucinating a user turn) and are kept
   as text: splitting on them would invent turns the annotator never saw.
2. Contents are stripped.
3. Consecutive turns of the same role are merged into one, joined by a blank line. The data has
   replies split across two markers (``"Assistant: Umm. Just a second...\\n\\nAssistant: A solar
   panel costs..."``); merging keeps the dialog alternating, which the chat format requires, and
   keeps the shared prompt of a chosen/rejected pair identical.
4. Empty turns are kept as ``""`` (an empty reply is what was rated); dropping them would make
   the neighbouring turns of the other role collide. Empty parts are ignored when merging.
5. Text before the first marker, or a first turn that is not Human, is an error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from llama2_lightning.chat import Message

_HH_MARKER = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):")
_HH_ROLES: dict[str, Literal["user", "assistant"]] = {"Human": "user", "Assistant": "assistant"}


def parse_hh_dialog(text: str) -> list[Message]:
    """Parse one HH-RLHF dialog string into alternating user/assistant messages (rules above)."""
    if not isinstance(text, str):
        raise ValueError(f"HH dialog must be a str, got {type(text).__name__}")
    matches = list(_HH_MARKER.finditer(text))
    if not matches:
        raise ValueError(f"HH dialog has no '\\n\\nHuman:' turn: {text[:80]!r}")
    head = text[: matches[0].start()]
    if head.strip():
        raise ValueError(f"HH dialog has text before its first turn marker: {head[:80]!r}")
    if matches[0].group(1) != "Human":
        raise ValueError(f"HH dialog must start with a Human turn, got: {text[:80]!r}")

    roles: list[Literal["user", "assistant"]] = []
    contents: list[list[str]] = []
    for k, match in enumerate(matches):
        end = matches[k + 1].start() if k + 1 < len(matches) else len(text)
        role = _HH_ROLES[match.group(1)]
        content = text[match.end() : end].strip()
        if roles and roles[-1] == role:
            contents[-1].append(content)  # rule 3: merge a same-role continuation
        else:
            roles.append(role)
            contents.append([content])
    return [
        {"role": role, "content": "\n\n".join(c for c in parts if c)}
        for role, parts in zip(roles, contents)
    ]


def hh_pair_to_prompt_and_answers(chosen: str, rejected: str) -> tuple[list[Message], str, str]:
    """Split an HH preference pair into (shared prompt messages, chosen answer, rejected answer).

    Both dialogs must end with an Assistant turn and agree on everything before it. A pair whose
    answers are equal (line 722 of the shipped helpful pairs) is returned as is; dropping it is the
    caller's decision.
    """
    parsed = {"chosen": parse_hh_dialog(chosen), "rejected": parse_hh_dialog(rejected)}
    for name, dialog in parsed.items():
        if dialog[-1]["role"] != "assistant":
            raise ValueError(f"HH {name} dialog must end with an Assistant turn")
    prompt = parsed["chosen"][:-1]
    if parsed["rejected"][:-1] != prompt:
        at = next(
            (i for i, (a, b) in enumerate(zip(prompt, parsed["rejected"][:-1])) if a != b),
            min(len(prompt), len(parsed["rejected"]) - 1),
        )
        raise ValueError(
            f"HH chosen and rejected dialogs differ before their last Assistant turn "
            f"(first difference at message {at}); they must share the prompt"
        )
    return prompt, parsed["chosen"][-1]["content"], parsed["rejected"][-1]["content"]


def self_instruct_to_dialogs(record: Mapping[str, Any]) -> list[list[Message]]:
    """One single-turn dialog per instance of a self-instruct task.

    The user turn is the instruction, followed by the instance input after a blank line when the
    input is non-empty; the assistant turn is the instance output.
    """
    rid = record.get("id", "<no id>")
    instruction = record.get("instruction")
    instances = record.get("instances")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"self-instruct record {rid}: 'instruction' must be a non-empty str")
    if not isinstance(instances, list) or not instances:
        raise ValueError(f"self-instruct record {rid}: 'instances' must be a non-empty list")
    dialogs: list[list[Message]] = []
    for k, instance in enumerate(instances):
        if not isinstance(instance, Mapping):
            raise ValueError(f"self-instruct record {rid}, instance {k}: expected an object")
        inp = instance.get("input", "")
        out = instance.get("output")
        if not isinstance(inp, str) or not isinstance(out, str):
            raise ValueError(
                f"self-instruct record {rid}, instance {k}: 'input' and 'output' must be str"
            )
        user = instruction.strip() + (f"\n\n{inp.strip()}" if inp.strip() else "")
        dialogs.append([{"role": "user", "content": user}, {"role": "assistant", "content": out.strip()}])
    return dialogs
