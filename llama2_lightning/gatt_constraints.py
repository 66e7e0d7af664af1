"""Checkable instructions enforced while sampling Ghost Attention dialogs (a small model's help).

The paper (section 3.3) samples GAtt answers from its latest RLHF model with the instruction appended to every
user turn, and that 70B model follows "Always answer in French" when it is told every turn. A 135M model
mostly does not: asked for capital letters it answers in lower case, so rejection sampling on the check finds
almost nothing to train on. For the machine-checkable instructions of
:mod:`llama2_lightning.evaluation.instructions` the constraint can be put into the sampling itself, and the
answer is still the model's own, drawn under the constraint:

- ``no_e``: tokens whose text holds an ``e`` or ``E`` are masked out (the model writes around the letter);
- ``capitals``: the answer is sampled freely and upper-cased. (A mask of lower-case tokens was tried first:
  SmolLM2-135M's few all-capital tokens made its answers word salad, "I'D BE ALL UP, I'M ALL UP!");
- ``ahoy``: the answer is sampled freely and the closing word is appended when it is missing;
- ``short``: nothing to enforce; rejection sampling on the check (``--samples-per-turn``) picks a short one.

GAtt then does what the paper does with such dialogs: the written sample keeps the instruction in the system
turn only, so the model learns to keep following it when it is no longer repeated.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import Tensor

from llama2_lightning.evaluation.instructions import instruction as checkable_instruction
from llama2_lightning.tokenizer import Tokenizer

# The banned characters of each instruction a token mask can enforce: a token is allowed when its text holds none.
_BANNED: dict[str, Callable[[str], bool]] = {
    "no_e": lambda text: "e" in text or "E" in text,
}
AHOY = "Ahoy"
# A whole-token "<...>" is a special token's text (SmolLM2: "<|endoftext|>", "<gh_stars>"), never an answer's.
_MARKUP = re.compile(r"<[^<>\s]+>")


def token_texts(tokenizer: Tokenizer) -> list[str]:
    """Each id's text, decoded alone (a byte-level piece of a multi-byte character decodes to U+FFFD)."""
    return tokenizer.decode_batch([i] for i in range(tokenizer.vocab_size))


def allowed_token_mask(name: str, texts: list[str], vocab_size: int, eos_id: int) -> Tensor | None:
    """(vocab_size,) bool: the tokens an answer following checkable instruction ``name`` may use, or None
    when a mask cannot enforce it. ``texts``: :func:`token_texts`. Tokens that decode to nothing (special
    tokens other than EOS, e.g. a chat template's turn markers) are masked out too; EOS stays allowed so the
    answer can end. So are tokens whose whole text is one ``<...>`` tag (special tokens that decode to their
    name). Ids past the tokenizer's vocabulary (a model's padded embedding rows) are masked out."""
    checkable_instruction(name)  # a clear error for an unknown name
    banned = _BANNED.get(name)
    if banned is None:
        return None
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    for i, text in enumerate(texts[:vocab_size]):
        allowed[i] = bool(text) and not banned(text) and not _MARKUP.fullmatch(text)
    allowed[eos_id] = True
    return allowed


def finish_answer(name: str | None, answer: str) -> str:
    """The answer as an enforced instruction ``name`` leaves it: for ``capitals``, upper-cased; for ``ahoy``,
    the closing word appended when the answer does not already end with it; any other answer unchanged. An
    empty answer stays empty (the sampler ends the dialog there)."""
    if not answer.strip():
        return answer
    if name == "capitals":
        return answer.upper()
    if name == "ahoy" and not checkable_instruction("ahoy").check(answer):
        return f"{answer.rstrip()} {AHOY}!"
    return answer
