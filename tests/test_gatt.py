"""Ghost Attention (``llama2_lightning.gatt``): instructions, samples and their loss masks."""

from __future__ import annotations

import random
import re

import pytest
import sentencepiece as spm
from chat_reference import masked_runs, reference_encode

from llama2_lightning.chat import Message
from llama2_lightning.gatt import (
    GATT_HOBBIES, GATT_LANGUAGES, GATT_PUBLIC_FIGURES, append_instruction, encode_gatt, gatt_sample,
    sample_gatt_instruction,
)
from llama2_lightning.tokenizer import Tokenizer

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
