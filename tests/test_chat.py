"""The Llama 2-Chat format and its loss masks, checked against an independent re-implementation written
from the description of Meta's ``chat_completion`` (``tests/chat_reference.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import sentencepiece as spm
from chat_reference import DIALOG_CLOSED, DIALOG_OPEN, SYSTEM, masked_runs, reference_encode

from llama2_lightning.chat import (
    B_INST, B_SYS, E_INST, E_SYS, Message, encode_dialog, encode_prompt, format_dialog_text,
)
from llama2_lightning.data.readers import parse_hh_dialog
from llama2_lightning.jsonl import read_jsonl
from llama2_lightning.tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------- format


def test_constants() -> None:
    assert (B_INST, E_INST) == ("[INST]", "[/INST]")
    assert (B_SYS, E_SYS) == ("<<SYS>>\n", "\n<</SYS>>\n\n")


@pytest.mark.parametrize("dialog", [DIALOG_OPEN, DIALOG_CLOSED], ids=["open", "closed"])
def test_ids_match_independent_reference(
    tok: Tokenizer, sp: spm.SentencePieceProcessor, dialog: list[Message]
) -> None:
    ids, mask = encode_dialog(tok, dialog)
    assert ids == reference_encode(sp, dialog)
    assert len(mask) == len(ids)
    assert ids.count(sp.bos_id()) == 3


@pytest.mark.parametrize("dialog", [DIALOG_OPEN, DIALOG_CLOSED], ids=["open", "closed"])
def test_mask_covers_exactly_the_answers_and_eos(
    tok: Tokenizer, sp: spm.SentencePieceProcessor, dialog: list[Message]
) -> None:
    ids, mask = encode_dialog(tok, dialog)
    answers = [m["content"].strip() for m in dialog if m["role"] == "assistant"]
    runs = masked_runs(ids, mask)
    assert len(runs) == len(answers)
    for run, answer in zip(runs, answers):
        assert run[-1] == sp.eos_id()
        assert sp.eos_id() not in run[:-1]
        # Meta's format ends each answer with a space before EOS; it belongs to the answer.
        assert sp.decode(run[:-1]) == answer + " "
    # Everything unmasked is BOS or an [INST] ... [/INST] prompt.
    unmasked = [i for i, m in zip(ids, mask) if not m]
    assert sp.eos_id() not in unmasked
    prompt_text = sp.decode([i for i in unmasked if i != sp.bos_id()])
    assert prompt_text.count("[INST]") == 3 and prompt_text.count("[/INST]") == 3
    for answer in answers:
        assert answer not in prompt_text
    assert SYSTEM in prompt_text


def test_open_dialog_ends_ready_for_generation(
    tok: Tokenizer, sp: spm.SentencePieceProcessor
) -> None:
    ids, mask = encode_dialog(tok, DIALOG_OPEN)
    e_inst = sp.encode("[/INST]")  # "▁[", "/", "INST", "]"
    assert ids[-len(e_inst) :] == e_inst
    assert ids[-1] != sp.eos_id()
    assert not any(mask[-len(e_inst) :])
    assert encode_prompt(tok, DIALOG_OPEN) == ids
    # The closed dialog is the open one plus the answer and EOS.
    closed, _ = encode_dialog(tok, DIALOG_CLOSED, add_generation_prompt=False)
    assert closed[: len(ids)] == ids and closed[-1] == sp.eos_id()


def test_single_user_turn_and_no_system(tok: Tokenizer, sp: spm.SentencePieceProcessor) -> None:
    dialog: list[Message] = [{"role": "user", "content": "Hi"}]
    assert encode_prompt(tok, dialog) == [sp.bos_id()] + sp.encode("[INST] Hi [/INST]")


def test_format_dialog_text() -> None:
    dialog: list[Message] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " Hi "},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    # Meta strips the folded "<<SYS>>...<</SYS>>\n\n" + user string as a whole, so the first user
    # message keeps its leading space; later contents are stripped on both sides.
    assert format_dialog_text(dialog) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hi [/INST] Hello! </s><s>[INST] Bye [/INST]"
    )


@pytest.mark.parametrize(
    ("dialog", "kwargs", "match"),
    [
        ([], {}, "empty"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], {}, "message 1.*system"),
        ([{"role": "assistant", "content": "a"}], {}, "message 0.*expected role 'user'"),
        ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], {}, "message 1.*'user'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], {}, "message 1.*'assistant'"),
        ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], {}, "message 1.*unknown role 'bot'"),
        ([{"role": "user", "content": 3}], {}, "message 0.*str"),
        ([{"role": "user"}], {}, "message 0.*'content'"),
        ([{"role": "system", "content": "s"}], {}, "message 0.*followed by a user"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
         {"add_generation_prompt": True}, "message 1.*add_generation_prompt=True"),
        ([{"role": "user", "content": "a"}], {"add_generation_prompt": False}, "message 0.*add_generation_prompt=False"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
         {"train_turns": [True, True]}, "message 0.*train_turns"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
         {"train_turns": [True]}, "1 flags for 2 messages"),
    ],
)  # fmt: skip
def test_encode_dialog_errors(tok: Tokenizer, dialog: list, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode_dialog(tok, dialog, **kwargs)


class _MergingTokenizer:
    """A tokenizer that merges across the [/INST] boundary: one id per whole string."""

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [1] * bos + [1000 + len(text)] + [2] * eos


def test_boundary_merge_is_refused_not_mislabelled() -> None:
    dialog: list[Message] = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ValueError, match="message 1.*not a prefix"):
        encode_dialog(_MergingTokenizer(), dialog)


def test_answer_boundary_holds_on_real_hh_dialogs(tok: Tokenizer, shared_data: Path) -> None:
    # The prefix property on messy real text (URLs, lists, odd spacing, empty answers).
    n_answers = 0
    for _, record in read_jsonl(shared_data / "hh_helpful_pairs.jsonl.gz"):
        dialog = parse_hh_dialog(record["chosen"])
        ids, mask = encode_dialog(tok, dialog, add_generation_prompt=False)
        runs = masked_runs(ids, mask)
        assert len(runs) == sum(m["role"] == "assistant" for m in dialog)
        assert all(run[-1] == tok.eos_id for run in runs)
        n_answers += len(runs)
    assert n_answers > 2000
