"""Llama 2-Chat dialog format, answer-only loss masks, and Ghost Attention (GAtt).

The format matches Meta's reference ``chat_completion`` (Touvron et al. 2023): an optional system
message is folded into the first user turn between ``<<SYS>>`` markers, each complete
(user, assistant) pair becomes its own ``<s>[INST] user [/INST] answer </s>`` sequence, and a
trailing user turn is left open (``<s>[INST] user [/INST]``) for the model to answer.

SFT trains on answer tokens only (paper section 3.1), so :func:`encode_dialog` returns a mask that
is True exactly on each answer and its EOS. GAtt (section 3.3) narrows that mask to the last
answer; see :func:`gatt_sample`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal, Protocol, TypedDict

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
# Text stand-ins for BOS/EOS in format_dialog_text; they are the pieces Llama's tokenizer uses.
BOS_TEXT, EOS_TEXT = "<s>", "</s>"


class ChatTokenizer(Protocol):
    """What the chat format needs from a tokenizer; ``llama2_lightning.Tokenizer`` satisfies it."""

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...


# --------------------------------------------------------------------------------------------
# Validation and the (prompt, answer) turn structure
# --------------------------------------------------------------------------------------------


def _check_message(message: object, position: int) -> None:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise ValueError(
            f"message {position}: expected a dict with 'role' and 'content', got {message!r}"
        )
    if message["role"] not in ("system", "user", "assistant"):
        raise ValueError(
            f"message {position}: unknown role {message['role']!r}; "
            "allowed roles are 'system', 'user', 'assistant'"
        )
    if not isinstance(message["content"], str):
        raise ValueError(
            f"message {position}: content must be str, got {type(message['content']).__name__}"
        )


def _turns(
    messages: Sequence[Message], add_generation_prompt: bool | None
) -> tuple[list[tuple[str, str | None, int | None]], bool]:
    """Validate a dialog and return its turns as (user_content, answer_or_None, answer_position).

    ``user_content`` already carries the folded system prompt and is stripped the way Meta's
    reference strips it (the folded string as a whole, so whitespace inside the system block is
    kept). ``answer_position`` is the index of the assistant message in ``messages`` so callers can
    attach per-message flags. The bool says whether the last turn is left open for generation.
    """
    if len(messages) == 0:
        raise ValueError("dialog is empty: expected at least one user message")
    for i, m in enumerate(messages):
        _check_message(m, i)
    for i, m in enumerate(messages[1:], start=1):
        if m["role"] == "system":
            raise ValueError(
                f"message {i}: a system message is only allowed as the first message"
            )

    start = 0
    system: str | None = None
    if messages[0]["role"] == "system":
        if len(messages) == 1:
            raise ValueError("message 0: a system message must be followed by a user message")
        system = messages[0]["content"]
        start = 1

    # After the optional system message, roles must alternate user, assistant, user, ...
    for i in range(start, len(messages)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if messages[i]["role"] != expected:
            raise ValueError(
                f"message {i}: expected role {expected!r}, got {messages[i]['role']!r} "
                "(after an optional system message, roles must alternate user/assistant "
                "starting with user)"
            )

    ends_with_user = messages[-1]["role"] == "user"
    if add_generation_prompt is True and not ends_with_user:
        raise ValueError(
            f"message {len(messages) - 1}: add_generation_prompt=True needs the dialog to end "
            "with a user message, but it ends with an assistant message"
        )
    if add_generation_prompt is False and ends_with_user:
        raise ValueError(
            f"message {len(messages) - 1}: add_generation_prompt=False needs the dialog to end "
            "with an assistant message, but it ends with a user message"
        )

    turns: list[tuple[str, str | None, int | None]] = []
    for i in range(start, len(messages), 2):
        user = messages[i]["content"]
        if i == start and system is not None:
            user = B_SYS + system + E_SYS + user
        if i + 1 < len(messages):
            turns.append((user.strip(), messages[i + 1]["content"].strip(), i + 1))
        else:
            turns.append((user.strip(), None, None))
    return turns, ends_with_user


def _prompt_text(user: str) -> str:
    return f"{B_INST} {user} {E_INST}"


def _pair_text(user: str, answer: str) -> str:
    # The trailing space is part of Meta's format; it becomes its own "▁" piece before EOS.
    return f"{_prompt_text(user)} {answer} "


# --------------------------------------------------------------------------------------------
# Public encoding API
# --------------------------------------------------------------------------------------------


def encode_dialog(
    tokenizer: ChatTokenizer,
    messages: Sequence[Message],
    add_generation_prompt: bool | None = None,
    *,
    train_turns: Sequence[bool] | None = None,
) -> tuple[list[int], list[bool]]:
    """Encode a dialog in the Llama 2-Chat format; return (ids, loss_mask).

    ``add_generation_prompt``: None accepts either ending (a trailing user turn is left open);
    True requires a trailing user turn; False requires a trailing assistant turn (an SFT sample).

    ``loss_mask`` is True on the answer tokens and the EOS of every assistant message, False on
    BOS and on the ``[INST] ... [/INST]`` prompt tokens. ``train_turns`` (one flag per message)
    restricts it to the assistant messages flagged True; GAtt uses it to train the last answer only.
    """
    turns, _ = _turns(messages, add_generation_prompt)
    if train_turns is not None:
        if len(train_turns) != len(messages):
            raise ValueError(
                f"train_turns has {len(train_turns)} flags for {len(messages)} messages"
            )
        for i, (flag, m) in enumerate(zip(train_turns, messages)):
            if flag and m["role"] != "assistant":
                raise ValueError(
                    f"message {i}: train_turns is True on a {m['role']!r} message; "
                    "only assistant messages carry a loss"
                )

    ids: list[int] = []
    mask: list[bool] = []
    for user, answer, position in turns:
        prompt_ids = tokenizer.encode(_prompt_text(user), bos=True, eos=False)
        if answer is None:
            # Open turn for generation: the model continues right after [/INST].
            ids += prompt_ids
            mask += [False] * len(prompt_ids)
            continue
        pair_ids = tokenizer.encode(_pair_text(user, answer), bos=True, eos=True)
        # The pair is tokenised as one string (as Meta does), so the answer boundary must be
        # recovered. Llama's tokenizer splits on whitespace, so "[/INST]" + " answer" never merges
        # and the prompt's ids are a prefix of the pair's ids; a tokenizer that merges across the
        # boundary would make any split a guess, so refuse rather than mislabel tokens.
        n = len(prompt_ids)
        if pair_ids[:n] != prompt_ids or len(pair_ids) <= n:
            raise ValueError(
                f"message {position}: the tokenizer merges the answer with the preceding "
                f"{E_INST!r} (the prompt's ids are not a prefix of the prompt+answer ids), so the "
                "answer tokens cannot be located for the loss mask; use a tokenizer that splits "
                "on whitespace (Llama's does)"
            )
        train = train_turns is None or (position is not None and bool(train_turns[position]))
        ids += pair_ids
        mask += [False] * n + [train] * (len(pair_ids) - n)
    return ids, mask


def encode_prompt(tokenizer: ChatTokenizer, messages: Sequence[Message]) -> list[int]:
    """Ids of a dialog that ends with a user turn, left open for the model's answer."""
    ids, _ = encode_dialog(tokenizer, messages, add_generation_prompt=True)
    return ids


def format_dialog_text(messages: Sequence[Message]) -> str:
    """The dialog as the text the tokenizer sees, with ``<s>``/``</s>`` marking BOS/EOS."""
    turns, _ = _turns(messages, None)
    parts = []
    for user, answer, _ in turns:
        if answer is None:
            parts.append(BOS_TEXT + _prompt_text(user))
        else:
            parts.append(BOS_TEXT + _pair_text(user, answer) + EOS_TEXT)
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# Ghost Attention (paper section 3.3)
# --------------------------------------------------------------------------------------------

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
        _check_message(m, i)
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
    _turns(messages, add_generation_prompt=False)

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
) -> tuple[list[int], list[bool]]:
    """(ids, loss_mask) of a GAtt sample; the mask is True only on the last answer and its EOS."""
    sample, flags = gatt_sample(messages, instruction, placement)
    return encode_dialog(tokenizer, sample, add_generation_prompt=False, train_turns=flags)
