"""Chat format, loss masks, Ghost Attention and dataset parsers.

The format is checked against an independent re-implementation written here from the description
of Meta's ``chat_completion`` and run on SentencePiece directly, not through the package.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

import pytest
import sentencepiece as spm

from llama2_lightning.chat import (
    B_INST,
    B_SYS,
    E_INST,
    E_SYS,
    GATT_HOBBIES,
    GATT_LANGUAGES,
    GATT_PUBLIC_FIGURES,
    Message,
    append_instruction,
    encode_dialog,
    encode_gatt,
    encode_prompt,
    format_dialog_text,
    gatt_sample,
    sample_gatt_instruction,
)
from llama2_lightning.dialogs import (
    hh_pair_to_prompt_and_answers,
    parse_hh_dialog,
    read_jsonl,
    self_instruct_to_dialogs,
)
from llama2_lightning.tokenizer import Tokenizer

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


@pytest.fixture
def sp(llama_tokenizer_path: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(llama_tokenizer_path))


@pytest.fixture
def tok(llama_tokenizer_path: Path) -> Tokenizer:
    return Tokenizer(llama_tokenizer_path)


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


# ------------------------------------------------------------------------------------------ GAtt

INSTRUCTION = "Always answer in French."
BASE: list[Message] = [
    {"role": "user", "content": "Tell me about cats."},
    {"role": "assistant", "content": "Les chats sont des animaux."},
    {"role": "user", "content": "And dogs?"},
    {"role": "assistant", "content": "Les chiens sont fideles."},
    {"role": "user", "content": "Which is better?"},
    {"role": "assistant", "content": "Les deux sont formidables."},
]


def test_append_instruction_every_user_turn() -> None:
    synth = append_instruction(BASE, INSTRUCTION)
    for m, orig in zip(synth, BASE):
        if m["role"] == "user":
            assert m["content"] == orig["content"] + " " + INSTRUCTION
        else:
            assert m == orig
    assert BASE[0]["content"] == "Tell me about cats."  # input not mutated


@pytest.mark.parametrize("placement", ["system", "first_user"])
def test_gatt_sample_keeps_instruction_only_in_first_turn(placement: str) -> None:
    synth = append_instruction(BASE, INSTRUCTION)
    sample, flags = gatt_sample(synth, INSTRUCTION, placement=placement)  # type: ignore[arg-type]
    if placement == "system":
        assert sample[0] == {"role": "system", "content": INSTRUCTION}
        users = [m for m in sample if m["role"] == "user"]
        assert [u["content"] for u in users] == [m["content"] for m in BASE if m["role"] == "user"]
    else:
        assert sample[0]["content"] == BASE[0]["content"] + " " + INSTRUCTION
        assert sample[1:] == BASE[1:]
    assert sum(INSTRUCTION in m["content"] for m in sample) == 1
    assert flags == [False] * (len(sample) - 1) + [True]


@pytest.mark.parametrize("placement", ["system", "first_user"])
def test_encode_gatt_trains_only_the_last_answer(
    tok: Tokenizer, sp: spm.SentencePieceProcessor, placement: str
) -> None:
    synth = append_instruction(BASE, INSTRUCTION)
    ids, mask = encode_gatt(tok, synth, INSTRUCTION, placement=placement)  # type: ignore[arg-type]
    runs = masked_runs(ids, mask)
    assert len(runs) == 1
    first = mask.index(True)
    assert all(mask[first:]) and not any(mask[:first])  # every label before the last answer is off
    assert runs[0][-1] == sp.eos_id()
    assert sp.decode(runs[0][:-1]) == BASE[-1]["content"] + " "
    # Same ids as the plain encoding of the training dialog: GAtt only changes the mask.
    sample, _ = gatt_sample(synth, INSTRUCTION, placement=placement)  # type: ignore[arg-type]
    assert ids == reference_encode(sp, sample)
    assert sp.decode(ids).count(INSTRUCTION) == 1


def test_gatt_merges_into_existing_system_prompt() -> None:
    synth = append_instruction([{"role": "system", "content": "Be kind."}, *BASE[:2]], INSTRUCTION)
    sample, flags = gatt_sample(synth, INSTRUCTION)
    assert sample[0] == {"role": "system", "content": "Be kind.\n" + INSTRUCTION}
    assert sample[1] == BASE[0] and flags == [False, False, True]


def test_gatt_errors() -> None:
    with pytest.raises(ValueError, match="message 2.*does not end with the GAtt instruction"):
        gatt_sample(append_instruction(BASE[:2], INSTRUCTION) + BASE[2:], INSTRUCTION)
    with pytest.raises(ValueError, match="add_generation_prompt=False"):
        gatt_sample(append_instruction(BASE[:3], INSTRUCTION), INSTRUCTION)
    with pytest.raises(ValueError, match="empty"):
        gatt_sample(BASE, "  ")
    with pytest.raises(ValueError, match="placement"):
        gatt_sample(append_instruction(BASE, INSTRUCTION), INSTRUCTION, placement="last")  # type: ignore[arg-type]


_SHORT = re.compile(r"^(Hobby|Language|Figure): ")


def test_sample_gatt_instruction_seeded_and_shortened_half_the_time() -> None:
    a = [sample_gatt_instruction(random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng1, rng2 = random.Random(123), random.Random(123)
    draws = [sample_gatt_instruction(rng1) for _ in range(200)]
    assert draws == [sample_gatt_instruction(rng2) for _ in range(200)]
    assert len(set(draws)) > 100  # combinations, not a handful of fixed strings
    short = [d for d in draws if _SHORT.match(d)]
    assert 0.3 <= len(short) / len(draws) <= 0.7
    items = (*GATT_HOBBIES, *GATT_LANGUAGES, *GATT_PUBLIC_FIGURES)
    for d in draws:
        assert any(item in d for item in items)
        if _SHORT.match(d):  # a short instruction is short throughout
            assert all(re.match(r"(Hobby|Language|Figure): ", p) for p in re.split(r"(?<=\.) ", d))
        else:
            assert ":" not in d
    # Combinations of 1-3 constraints all occur.
    n_constraints = {len(re.split(r"(?<=\.) (?=[A-Z])", d)) for d in draws}
    assert {1, 2, 3} <= n_constraints


def test_gatt_lists_are_small_and_clean() -> None:
    for items in (GATT_HOBBIES, GATT_LANGUAGES, GATT_PUBLIC_FIGURES):
        assert 10 <= len(items) <= 20 and len(set(items)) == len(items)
        assert not any(":" in i or "." in i for i in items)


# --------------------------------------------------------------------------------------- parsers


@pytest.mark.parametrize("name", ["hh_helpful_pairs.jsonl.gz", "hh_harmless_pairs.jsonl.gz"])
def test_hh_all_shipped_records_parse(shared_data: Path, name: str) -> None:
    n = 0
    for _, record in read_jsonl(shared_data / name):
        chosen = parse_hh_dialog(record["chosen"])
        rejected = parse_hh_dialog(record["rejected"])
        for dialog in (chosen, rejected):
            assert [m["role"] for m in dialog] == ["user", "assistant"] * (len(dialog) // 2)
        prompt, c, r = hh_pair_to_prompt_and_answers(record["chosen"], record["rejected"])
        assert prompt == chosen[:-1] == rejected[:-1]
        assert (c, r) == (chosen[-1]["content"], rejected[-1]["content"])
        n += 1
    assert n == 2000


def test_hh_quirks() -> None:
    # Split reply, inline fake "Human:", an empty reply, trailing whitespace.
    text = (
        "\n\nHuman: How much?\n\nAssistant: Umm. Just a second...\n\nAssistant: About $50.  "
        "Human: thanks\n\nHuman: ok\n\nAssistant:\n\nHuman: hello?\n\nAssistant: Hi! "
    )
    assert parse_hh_dialog(text) == [
        {"role": "user", "content": "How much?"},
        {"role": "assistant", "content": "Umm. Just a second...\n\nAbout $50.  Human: thanks"},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "hello?"},
        {"role": "assistant", "content": "Hi!"},
    ]
    assert parse_hh_dialog("Human: hi\n\nAssistant: yo") == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}
    ]  # fmt: skip
    prompt, c, r = hh_pair_to_prompt_and_answers(text, text.replace("Hi! ", "Hey."))
    assert len(prompt) == 5 and (c, r) == ("Hi!", "Hey.")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("\n\nAssistant: hi", "start with a Human"),
        ("intro\n\nHuman: hi", "before its first"),
        ("no markers at all", "no"),
    ],
)
def test_hh_parse_errors(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_hh_dialog(text)


def test_hh_pair_errors() -> None:
    with pytest.raises(ValueError, match="chosen dialog must end with an Assistant"):
        hh_pair_to_prompt_and_answers("\n\nHuman: a", "\n\nHuman: a\n\nAssistant: b")
    with pytest.raises(ValueError, match="message 0.*share the prompt"):
        hh_pair_to_prompt_and_answers(
            "\n\nHuman: a\n\nAssistant: b", "\n\nHuman: x\n\nAssistant: b"
        )


def test_self_instruct_shipped_file(shared_data: Path) -> None:
    records = [r for _, r in read_jsonl(shared_data / "self_instruct_seed_tasks.jsonl")]
    assert len(records) == 175
    dialogs = [d for r in records for d in self_instruct_to_dialogs(r)]
    assert len(dialogs) == sum(len(r["instances"]) for r in records)
    for d in dialogs:
        assert [m["role"] for m in d] == ["user", "assistant"] and d[1]["content"]
    first = self_instruct_to_dialogs(records[1])[0]  # antonym_relation has an input
    assert first[0]["content"] == records[1]["instruction"] + "\n\n" + records[1]["instances"][0]["input"]
    no_input = self_instruct_to_dialogs(records[0])[0]
    assert no_input[0]["content"] == records[0]["instruction"]


def test_self_instruct_errors() -> None:
    with pytest.raises(ValueError, match="record t1.*instances"):
        self_instruct_to_dialogs({"id": "t1", "instruction": "x", "instances": []})
    with pytest.raises(ValueError, match="record t2, instance 0"):
        self_instruct_to_dialogs({"id": "t2", "instruction": "x", "instances": [{"input": ""}]})


@pytest.mark.parametrize("gz", [False, True])
def test_read_jsonl_bad_lines(tmp_path: Path, gz: bool) -> None:
    lines = ['{"a": 1}', "", '{"a": 2', "[1, 2]", '{"a": 3}']
    data = ("\n".join(lines) + "\n").encode()
    path = tmp_path / ("d.jsonl.gz" if gz else "d.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:3: malformed JSON"):
        list(read_jsonl(path))
    reader = read_jsonl(path, on_bad_line="skip")
    assert list(reader) == [(1, {"a": 1}), (5, {"a": 3})]
    assert reader.skipped == 2 and reader.skipped_lines == [3, 4]


def test_read_jsonl_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"a": 1}) + "\n" + "[]\n")
    with pytest.raises(ValueError, match=r"x\.jsonl:2: expected a JSON object"):
        list(read_jsonl(path))
    with pytest.raises(ValueError, match="on_bad_line"):
        read_jsonl(path, on_bad_line="warn")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_jsonl(tmp_path / "missing.jsonl")
