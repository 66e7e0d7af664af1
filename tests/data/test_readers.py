"""The dataset parsers of ``llama2_lightning.data.readers`` (HH-RLHF dialogs, self-instruct) on the shipped files."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama2_lightning.data.readers import hh_pair_to_prompt_and_answers, parse_hh_dialog, self_instruct_to_dialogs
from llama2_lightning.jsonl import read_jsonl

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
