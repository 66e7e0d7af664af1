"""Ghost Attention (GAtt, paper section 3.3): instruction sampling and training samples.

While sampling, a synthetic system instruction is appended to every user turn; the training sample keeps it
only in the first turn and the loss only on the last answer (every earlier turn is zeroed).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

from llama2_lightning.chat import ChatTokenizer, Message, check_message, dialog_turns, encode_dialog
from llama2_lightning.chat_template import ChatTemplate

# Separator between a user message and the synthetic instruction appended to it.
GATT_SEPARATOR = " "

GATT_HOBBIES: tuple[str, ...] = (
    "tennis", "chess", "gardening", "hiking", "painting", "baking", "birdwatching",
    "photography", "playing the guitar", "knitting", "astronomy", "cycling", "rock climbing",
    "fishing", "pottery",
)  # fmt: skip
GATT_LANGUAGES: tuple[str, ...] = (
    "French", "Spanish", "German", "Italian", "Portuguese", "Japanese", "Chinese", "Hindi",
    "Arabic", "Russian", "Dutch", "Swedish", "Korean", "Turkish", "Greek",
)  # fmt: skip
GATT_PUBLIC_FIGURES: tuple[str, ...] = (
    "Napoleon", "Marie Curie", "Albert Einstein", "Cleopatra", "William Shakespeare",
    "Abraham Lincoln", "Ada Lovelace", "Leonardo da Vinci", "Mahatma Gandhi", "Frida Kahlo",
    "Isaac Newton", "Jane Austen", "Nelson Mandela", "Charles Darwin", "Amelia Earhart",
)  # fmt: skip

# (verbose templates, short form) per constraint kind. The short forms follow the paper's
# "Always act as Napoleon from now" -> "Figure: Napoleon." example.
_GATT_CONSTRAINTS: dict[str, tuple[tuple[str, ...], str]] = {
    "hobby": (("You enjoy {}.", "Your favourite hobby is {}."), "Hobby: {}."),
    "language": (("Always answer in {}.", "Speak in {}."), "Language: {}."),
    "figure": (("Act as {}.", "Always act as {} from now on."), "Figure: {}."),
}


def sample_gatt_instruction(
    rng: random.Random,
    hobbies: Sequence[str] = GATT_HOBBIES,
    languages: Sequence[str] = GATT_LANGUAGES,
    public_figures: Sequence[str] = GATT_PUBLIC_FIGURES,
) -> str:
    """A random GAtt instruction: 1-3 constraints (hobby, language, public figure) combined, in
    random order, written tersely half the time ("Hobby: tennis. Language: French.").

    All randomness comes from ``rng`` so a seeded generator reproduces the dataset.
    """
    pools = {"hobby": hobbies, "language": languages, "figure": public_figures}
    kinds = rng.sample(sorted(pools), k=rng.randint(1, len(pools)))
    short = rng.random() < 0.5
    parts = []
    for kind in kinds:
        value = rng.choice(list(pools[kind]))
        verbose, terse = _GATT_CONSTRAINTS[kind]
        parts.append((terse if short else rng.choice(verbose)).format(value))
    return " ".join(parts)


def append_instruction(messages: Sequence[Message], instruction: str) -> list[Message]:
    """Copy of the dialog with ``instruction`` appended to every user turn: the context used to
    sample answers that respect the instruction throughout the dialog."""
    instruction = instruction.strip()
    if not instruction:
        raise ValueError("instruction is empty")
    out: list[Message] = []
    for i, m in enumerate(messages):
        check_message(m, i)
        if m["role"] == "user":
            content = m["content"].rstrip()
            content = f"{content}{GATT_SEPARATOR}{instruction}" if content else instruction
            out.append({"role": "user", "content": content})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


def _remove_instruction(content: str, instruction: str, position: int) -> str:
    stripped = content.rstrip()
    if not stripped.endswith(instruction):
        raise ValueError(
            f"message {position}: user message does not end with the GAtt instruction "
            f"{instruction!r}; was the dialog built with append_instruction?"
        )
    return stripped[: len(stripped) - len(instruction)].rstrip()


def gatt_sample(
    messages: Sequence[Message],
    instruction: str,
    placement: Literal["system", "first_user"] = "system",
) -> tuple[list[Message], list[bool]]:
    """Turn a dialog sampled with the instruction on every user turn into a GAtt training sample.

    Returns (messages, train_flags): the instruction survives only at the start of the dialog and
    ``train_flags`` is True only on the final assistant message, so the loss is zero on every
    earlier turn, assistant turns included (their answers were generated *with* the instruction
    in view, which the training context no longer shows).

    ``placement="system"`` (default) moves the instruction into the system slot, appended after
    any existing system prompt. The paper concatenates it to the first user message but calls the
    result "the final system message"; in the Llama 2-Chat format the system block *is* the
    start of the first user turn (``[INST] <<SYS>> inst <</SYS>> user``), so this keeps the
    paper's position while teaching the model to obey system prompts, which is how GAtt is used at
    inference. ``placement="first_user"`` keeps it appended to the first user message verbatim.
    """
    if placement not in ("system", "first_user"):
        raise ValueError(f"placement must be 'system' or 'first_user', got {placement!r}")
    instruction = instruction.strip()
    if not instruction:
        raise ValueError("instruction is empty")
    # Validation only: a GAtt sample must be well formed and end with the answer to train on.
    dialog_turns(messages, add_generation_prompt=False)

    out: list[Message] = []
    first_user = True
    for i, m in enumerate(messages):
        if m["role"] == "user":
            content = _remove_instruction(m["content"], instruction, i)
            if first_user and placement == "first_user":
                content = f"{content}{GATT_SEPARATOR}{instruction}" if content else instruction
            first_user = False
            out.append({"role": "user", "content": content})
        else:
            out.append({"role": m["role"], "content": m["content"]})

    if placement == "system":
        if out[0]["role"] == "system":
            existing = out[0]["content"].rstrip()
            content = f"{existing}\n{instruction}" if existing else instruction
            out[0] = {"role": "system", "content": content}
        else:
            out.insert(0, {"role": "system", "content": instruction})

    flags = [False] * len(out)
    flags[-1] = True  # validated above: the last message is the assistant answer being trained
    return out, flags


def encode_gatt(
    tokenizer: ChatTokenizer,
    messages: Sequence[Message],
    instruction: str,
    placement: Literal["system", "first_user"] = "system",
    template: ChatTemplate | None = None,
) -> tuple[list[int], list[bool]]:
    """(ids, loss_mask) of a GAtt sample; the mask is True only on the last answer and its EOS (in the
    Llama 2 format, or in ``template``'s)."""
    sample, flags = gatt_sample(messages, instruction, placement)
    return encode_dialog(tokenizer, sample, add_generation_prompt=False, train_turns=flags, template=template)
