"""An independent re-implementation of Meta's ``chat_completion`` formatting, run on SentencePiece directly
(not through the package), and a helper to read masked spans; shared by the chat and GAtt tests."""

from __future__ import annotations

import sentencepiece as spm

from llama2_lightning.chat import Message

SYSTEM = "You are a terse assistant.\nAnswer in one sentence."
# Leading/trailing whitespace on purpose: the reference strips user and answer contents.
DIALOG_OPEN: list[Message] = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is the capital of France?  "},
    {"role": "assistant", "content": "  Paris is the capital of France."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome.\n"},
    {"role": "user", "content": "\tWhich one is older?"},
]
DIALOG_CLOSED: list[Message] = DIALOG_OPEN + [
    {"role": "assistant", "content": "Rome was founded first, in 753 BC (by tradition)."}
]


def reference_encode(sp: spm.SentencePieceProcessor, dialog: list[Message]) -> list[int]:
    """Independent re-implementation of Meta's chat_completion formatting from its description."""
    if dialog[0]["role"] == "system":
        first = {"role": "user", "content": "<<SYS>>\n" + dialog[0]["content"] + "\n<</SYS>>\n\n"
                 + dialog[1]["content"]}  # fmt: skip
        dialog = [first] + dialog[2:]
    bos, eos = sp.bos_id(), sp.eos_id()
    out: list[int] = []
    for user, answer in zip(dialog[0::2], dialog[1::2]):
        text = f"[INST] {user['content'].strip()} [/INST] {answer['content'].strip()} "
        out += [bos] + sp.encode(text) + [eos]
    if len(dialog) % 2 == 1:
        out += [bos] + sp.encode(f"[INST] {dialog[-1]['content'].strip()} [/INST]")
    return out


def masked_runs(ids: list[int], mask: list[bool]) -> list[list[int]]:
    runs: list[list[int]] = []
    prev = False
    for i, m in zip(ids, mask):
        if m and not prev:
            runs.append([])
        if m:
            runs[-1].append(i)
        prev = m
    return runs
