"""Llama 2-Chat dialog format and answer-only loss masks.

The format matches Meta's reference ``chat_completion`` (Touvron et al. 2023): an optional system
message is folded into the first user turn between ``<<SYS>>`` markers, each complete
(user, assistant) pair becomes its own ``<s>[INST] user [/INST] answer </s>`` sequence, and a
trailing user turn is left open (``<s>[INST] user [/INST]``) for the model to answer.

SFT trains on answer tokens only (paper section 3.1), so :func:`encode_dialog` returns a mask that
is True exactly on each answer and its EOS. GAtt (section 3.3) narrows that mask to the last
answer; see :func:`llama2_lightning.gatt.gatt_sample`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, TypedDict

from llama2_lightning.chat_template import ChatTemplate, encode_with_template

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


def check_message(message: object, position: int) -> None:
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


def dialog_turns(
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
        check_message(m, i)
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
    template: ChatTemplate | None = None,
) -> tuple[list[int], list[bool]]:
    """Encode a dialog in the Llama 2-Chat format; return (ids, loss_mask).

    ``add_generation_prompt``: None accepts either ending (a trailing user turn is left open);
    True requires a trailing user turn; False requires a trailing assistant turn (an SFT sample).

    ``loss_mask`` is True on the answer tokens and the EOS of every assistant message, False on
    BOS and on the ``[INST] ... [/INST]`` prompt tokens. ``train_turns`` (one flag per message)
    restricts it to the assistant messages flagged True; GAtt uses it to train the last answer only.
    """
    turns, ends_with_user = dialog_turns(messages, add_generation_prompt)
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

    if template is not None:
        train = [m["role"] == "assistant" and (train_turns is None or bool(train_turns[i]))
                 for i, m in enumerate(messages)]
        return encode_with_template(tokenizer, template, messages, ends_with_user, train)

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


def encode_prompt(tokenizer: ChatTokenizer, messages: Sequence[Message],
                  template: ChatTemplate | None = None) -> list[int]:
    """Ids of a dialog that ends with a user turn, left open for the model's answer."""
    ids, _ = encode_dialog(tokenizer, messages, add_generation_prompt=True, template=template)
    return ids


def format_dialog_text(messages: Sequence[Message]) -> str:
    """The dialog as the text the tokenizer sees, with ``<s>``/``</s>`` marking BOS/EOS."""
    turns, _ = dialog_turns(messages, None)
    parts = []
    for user, answer, _ in turns:
        if answer is None:
            parts.append(BOS_TEXT + _prompt_text(user))
        else:
            parts.append(BOS_TEXT + _pair_text(user, answer) + EOS_TEXT)
    return "".join(parts)


# The pair encoding a reward model is trained and scored on.
def encode_side(tokenizer: ChatTokenizer, prompt: Sequence[Message], answer: str,
                template: ChatTemplate | None = None) -> list[int]:
    """One side of a preference pair, the prompt then ``answer`` as a closed assistant turn: what a
    reward model reads in training and in scoring."""
    ids, _ = encode_dialog(tokenizer, [*prompt, {"role": "assistant", "content": answer}], add_generation_prompt=False,
                           template=template)
    return ids


def truncate_pair(chosen: list[int], rejected: list[int], max_seq_len: int, bos_id: int
                  ) -> tuple[list[int], list[int]] | None:
    """Fit both sides into ``max_seq_len`` by dropping their oldest tokens: each side keeps
    its last turn whole and loses the oldest context first, or
    None when the last turn of the longer side does not fit on its own."""
    cut = max(len(chosen), len(rejected)) - max_seq_len
    if cut <= 0:
        return chosen, rejected
    out = []
    for ids in (chosen, rejected):
        # Every chat turn starts with BOS and text never encodes to it, so the last BOS opens the
        # last turn; the prompt before it is the same on both sides.
        last_turn = len(ids) - 1 - ids[::-1].index(bos_id)
        if cut > last_turn:
            return None
        kept = ids[cut:]
        if kept[0] != bos_id:
            kept = [bos_id, *kept[1:]]  # cut < last_turn here, so the replaced token is older context
        out.append(kept)
    return out[0], out[1]
