"""The `chat` and `gatt` commands: piped conversations keep their history; GAtt dialogs keep the
instruction at the start only, after sampling every answer with it on every user turn."""

from __future__ import annotations

import io
import json
import shutil
import sys
from typing import Any
from pathlib import Path

import pytest
import torch

from paths import TOKENIZER

from llama2_lightning import Transformer
from llama2_lightning.chat import encode_dialog, encode_prompt
from llama2_lightning.chat_template import ChatTemplate
from llama2_lightning.checkpoint import load_model, save_hf
from llama2_lightning.cli import main
from llama2_lightning.commands import chat as chat_command
from llama2_lightning.commands import gatt as gatt_command
from llama2_lightning.data.sft import SFTDataModule
from llama2_lightning.gatt import GATT_SEPARATOR
from llama2_lightning.generation import generate
from llama2_lightning.tokenizer import Tokenizer


def _save_random(directory: Path, **overrides: int) -> Path:
    torch.manual_seed(0)
    model = Transformer.from_name("tiny", **overrides)
    save_hf(model.config, model.state_dict(), directory)
    shutil.copy(TOKENIZER, directory / "tokenizer.model")  # found beside the weights
    return directory


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_random(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(TOKENIZER)


@pytest.fixture
def prompt_spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[dict[str, str]], list[int]]]:
    """Every (messages, ids) the commands encode as a prompt."""
    calls: list[tuple[list[dict[str, str]], list[int]]] = []

    def spy(tokenizer: Tokenizer, messages: list[dict[str, str]], template: ChatTemplate | None = None) -> list[int]:
        ids = encode_prompt(tokenizer, messages, template)
        calls.append(([dict(m) for m in messages], ids))
        return ids

    monkeypatch.setattr(chat_command, "encode_prompt", spy)
    monkeypatch.setattr(gatt_command, "encode_prompt", spy)
    return calls


def _greedy_answer(model: Transformer, tok: Tokenizer, messages: list[dict[str, str]], n: int) -> str:
    [row] = generate(model, [encode_prompt(tok, messages)], n, temperature=0.0, eos_id=tok.eos_id).as_lists()
    assert len(row) == n or row[-1] == tok.eos_id
    return tok.decode([t for t in row if t != tok.eos_id]).strip()


# ------------------------------------------------------------------------------------------- chat


def test_chat_with_piped_input_answers_each_turn_with_the_history(
    hf_dir: Path, tok: Tokenizer, prompt_spy: list, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("Good morrow, friend.\n\n  What did you say?  \n/exit\nnot read\n"))
    assert main(["chat", "--checkpoint", str(hf_dir), "--max-new-tokens", "12", "--temperature", "0"]) == 0
    out = capsys.readouterr().out

    user1 = {"role": "user", "content": "Good morrow, friend."}
    user2 = {"role": "user", "content": "What did you say?"}
    assert len(prompt_spy) == 2  # the blank line is skipped; nothing after /exit is read
    assert prompt_spy[0][0] == [user1]
    # The second prompt is the whole conversation so far: the first turn and the answer printed for it.
    model = load_model(hf_dir)
    answer1 = _greedy_answer(model, tok, [user1], 12)
    assert answer1  # a random model's greedy answer here is not empty, so the history check means something
    assert prompt_spy[1][0] == [user1, {"role": "assistant", "content": answer1}, user2]
    assert len(prompt_spy[1][1]) > len(prompt_spy[0][1]) + len(tok.encode(answer1))
    answer2 = _greedy_answer(model, tok, prompt_spy[1][0], 12)
    assert out == f"{answer1}\n{answer2}\n"


def test_chat_system_prompt_and_end_of_input(
    hf_dir: Path, tok: Tokenizer, prompt_spy: list, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nAgain\n"))  # no /exit: end of input ends the chat
    args = ["chat", "--checkpoint", str(hf_dir), "--tokenizer", str(TOKENIZER), "--system", "Speak in rhyme.",
            "--max-new-tokens", "5", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert len(prompt_spy) == 2 and len(first.strip()) > 0
    text = tok.decode(prompt_spy[1][1])
    assert text.startswith("[INST] <<SYS>>\nSpeak in rhyme.\n<</SYS>>\n\nHi [/INST]") and text.endswith("Again [/INST]")
    # Sampling (temperature 0.6 by default) is seeded: the same conversation again.
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nAgain\n"))
    assert main(args) == 0
    assert capsys.readouterr().out == first


def test_chat_forgets_the_oldest_exchange_when_the_context_is_full(
    tmp_path: Path, prompt_spy: list, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    small = _save_random(tmp_path / "small", max_seq_len=48)
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"Line number {k} of many.\n" for k in range(4))))
    assert main(["chat", "--checkpoint", str(small), "--max-new-tokens", "8", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) >= 4 and "forgot the oldest exchange" in captured.err
    sent: dict[str, tuple[list[dict[str, str]], list[int]]] = {}
    for messages, ids in prompt_spy:  # the last prompt built for a turn is the one answered
        sent[messages[-1]["content"]] = (messages, ids)
    assert len(sent) == 4 and all(len(ids) + 8 <= 48 for _, ids in sent.values())  # full answer budget each turn
    last_messages, _ = sent["Line number 3 of many."]
    assert len(last_messages) < 7 and last_messages[0]["role"] == "user"  # older exchanges dropped whole


# ------------------------------------------------------------------------------------------- GAtt


def _write_dialogs(path: Path) -> Path:
    dialogs = [
        [{"role": "user", "content": "Tell me about the sea."}, {"role": "user", "content": "And the moon?"},
         {"role": "user", "content": "Which is older?"}],
        # Assistant turns in the input are ignored (answers are re-sampled); the system prompt is kept.
        [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "Hello."},
         {"role": "assistant", "content": "IGNORED ANSWER"}, {"role": "user", "content": "Bye."}],
        [{"role": "user", "content": "One question only."}],
    ]
    path.write_text("".join(json.dumps({"messages": d}) + "\n" for d in dialogs))
    return path


@pytest.mark.parametrize("placement", ["system", "first_user"])
def test_gatt_samples_with_the_instruction_everywhere_and_keeps_it_at_the_start(
    placement: str, hf_dir: Path, tmp_path: Path, tok: Tokenizer, prompt_spy: list
) -> None:
    src = _write_dialogs(tmp_path / "dialogs.jsonl")
    out = tmp_path / "gatt.jsonl"
    args = ["gatt", "--input", str(src), "--output", str(out), "--checkpoint", str(hf_dir), "--max-new-tokens", "6",
            "--temperature", "1.0", "--seed", "7", "--batch-size", "2", "--placement", placement]
    assert main(args) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [len([m for m in r["messages"] if m["role"] == "user"]) for r in records] == [3, 2, 1]
    assert len({r["gatt_instruction"] for r in records}) == 3  # so prompts below can be told apart

    for k, record in enumerate(records):
        instruction, messages = record["gatt_instruction"], record["messages"]
        # While sampling, the instruction ended every user turn of this dialog's prompts ...
        prompts = [msgs for msgs, _ in prompt_spy if msgs[-1]["content"].endswith(GATT_SEPARATOR + instruction)]
        assert len(prompts) == sum(m["role"] == "user" for m in messages)
        for msgs in prompts:
            assert all(m["content"].endswith(GATT_SEPARATOR + instruction) for m in msgs if m["role"] == "user")
        # ... and each prompt's earlier answers are the ones written out.
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        assert "IGNORED ANSWER" not in answers and all(answers)
        assert [m["content"] for m in prompts[-1] if m["role"] == "assistant"] == answers[:-1]
        # In the written dialog, the instruction appears once, at the start.
        holders = [i for i, m in enumerate(messages) if instruction in m["content"]]
        if placement == "system":
            assert holders == [0] and messages[0]["role"] == "system"
            assert messages[0]["content"] == ("You are kind.\n" if k == 1 else "") + instruction
        else:
            first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
            assert holders == [first_user] and messages[first_user]["content"].endswith(instruction)
        # Only the last answer is trained (paper: loss zeroed on every earlier turn).
        flags = record["train_turns"]
        assert flags == [False] * (len(messages) - 1) + [True]
        ids, mask = encode_dialog(tok, messages, add_generation_prompt=False, train_turns=flags)
        trained = tok.decode([t for t, keep in zip(ids, mask) if keep and t != tok.eos_id]).strip()
        assert trained == answers[-1]

    # The file is SFT data as it is.
    dm = SFTDataModule(sources=[{"path": str(out), "format": "messages"}], tokenizer_path=str(TOKENIZER),
                       val_fraction=0.34)
    dm.setup()
    assert dm.stats["dialogs"] == 3
    # Seeded: the same command writes the same file.
    first = out.read_text()
    assert main(args) == 0
    assert out.read_text() == first


def test_gatt_reports_a_bad_input_line(hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "user", "content": "ok"}]}) + "\n"
                   + json.dumps({"messages": [{"role": "assistant", "content": "no user turn"}]}) + "\n")
    with pytest.raises(SystemExit):
        main(["gatt", "--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--checkpoint", str(hf_dir)])
    assert f"{src}:2: the dialog has no user turn" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_gatt_checkable_instructions_best_of_k_and_hh_input(hf_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """--format hh reads the user turns of HH dialogs (--min-turns / --max-turns); with checkable
    instructions each turn keeps the first of --samples-per-turn answers that follows the instruction,
    and --require-check drops a dialog whose trained answer does not."""
    src = tmp_path / "hh.jsonl"
    turns = [["a?", "b?", "c?"], ["only one?"], ["d?", "e?"]]
    src.write_text("".join(json.dumps({"chosen": "".join(f"\n\nHuman: {q}\n\nAssistant: x" for q in t),
                                       "rejected": "\n\nHuman: z\n\nAssistant: y"}) + "\n" for t in turns))
    calls: list[int] = []

    def scripted(model: Any, tokenizer: Any, prompts: list, *args: Any, num_samples: int = 1, **kw: Any) -> list[str]:
        calls.append(num_samples)
        return ["a long answer in lower case", "SHORT AND LOUD"][:num_samples] * len(prompts) if num_samples == 2 \
            else ["a long answer in lower case"] * len(prompts)

    monkeypatch.setattr(gatt_command, "sample_answers", scripted)
    out = tmp_path / "gatt.jsonl"
    base = ["gatt", "--input", str(src), "--format", "hh", "--min-turns", "2", "--max-turns", "2", "--output", str(out),
            "--checkpoint", str(hf_dir), "--instruction-set", "checkable", "--checkable", "capitals", "--max-new-tokens", "6"]
    assert main([*base, "--samples-per-turn", "2"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and set(calls) == {2}  # the one-turn dialog is skipped
    for record in records:
        assert record["messages"][0] == {"role": "system", "content": "Answer only in capital letters."}
        assert [m["content"] for m in record["messages"] if m["role"] == "user"] in (["a?", "b?"], ["d?", "e?"])
        assert all(m["content"] == "SHORT AND LOUD" for m in record["messages"] if m["role"] == "assistant")
    assert main([*base, "--require-check"]) == 0  # one sample per turn: it never follows the instruction
    assert out.read_text() == ""
    assert main([*base]) == 0 and len(out.read_text().splitlines()) == 2  # kept without --require-check


def test_gatt_skip_heldout_never_trains_on_an_evaluation_prompt(hf_dir: Path, tmp_path: Path, tok: Tokenizer,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """--skip-heldout drops every HH dialog that shares a user turn with the held-out prompts the evaluate
    command uses (same file, val_fraction and seed), and --limit counts the dialogs that are left."""
    from llama2_lightning.data.prompts import heldout_hh_prompts

    src = tmp_path / "hh.jsonl"
    src.write_text("".join(json.dumps({"chosen": f"\n\nHuman: q{i}?\n\nAssistant: a\n\nHuman: r{i}?\n\nAssistant: x",
                                       "rejected": f"\n\nHuman: q{i}?\n\nAssistant: a\n\nHuman: r{i}?\n\nAssistant: y"})
                           + "\n" for i in range(40)))
    held = {m["content"] for p in heldout_hh_prompts(src, tok, 128, 0.25, 5, "llama2") for m in p.messages
            if m["role"] == "user"}
    # HH prompt data keeps the first human turn: 10 held-out prompts (a quarter of 40), each one q{i}?
    assert len(held) == 10 and all(h.startswith("q") and h.endswith("?") for h in held)
    monkeypatch.setattr(gatt_command, "sample_answers",
                        lambda model, tokenizer, prompts, *a, num_samples=1, **kw: ["ok"] * len(prompts) * num_samples)
    out = tmp_path / "gatt.jsonl"
    base = ["gatt", "--input", str(src), "--format", "hh", "--output", str(out), "--checkpoint", str(hf_dir),
            "--max-new-tokens", "4"]
    assert main([*base, "--skip-heldout", "0.25", "--heldout-seed", "5", "--limit", "40"]) == 0
    kept = [[m["content"] for m in json.loads(line)["messages"] if m["role"] == "user"]
            for line in out.read_text().splitlines()]
    assert len(kept) == 30 and not held.intersection(u for turns in kept for u in turns)
    assert main([*base, "--skip-heldout", "0.25", "--heldout-seed", "5", "--limit", "30"]) == 0
    assert len(out.read_text().splitlines()) == 30  # the limit counts what is left after skipping
    assert main([*base, "--limit", "40"]) == 0
    assert len(out.read_text().splitlines()) == 40  # without it, the held-out dialogs are used too
    with pytest.raises(SystemExit):
        main(["gatt", "--input", str(src), "--output", str(out), "--checkpoint", str(hf_dir), "--skip-heldout", "0.1"])
    with pytest.raises(SystemExit):  # a fraction, not a count
        main([*base, "--skip-heldout", "5"])
