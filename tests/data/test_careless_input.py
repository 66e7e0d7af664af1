"""Input that used to be accepted silently, or reported unhelpfully: a `.json` file of JSONL taken as
one text document, a file of NUL bytes trained as byte tokens, SFT dialogs with empty turns trained
and not counted, JSON error columns off by the line ending, and an error that pointed at counts it
never printed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama2_lightning.data.pretrain import iter_documents
from llama2_lightning.data.sft import SFTDataModule
from llama2_lightning.jsonl import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = str(ROOT / "data" / "tokenizer.model")


def test_pretraining_refuses_a_json_file(tmp_path: Path) -> None:
    path = tmp_path / "docs.json"
    path.write_text('{"text": "one"}\n{"text": "two"}\n')
    with pytest.raises(ValueError, match=r"docs\.json: a \.json file is neither plain text nor JSONL.*rename it \.jsonl"):
        list(iter_documents(path))


def test_pretraining_refuses_nul_bytes(tmp_path: Path) -> None:
    path = tmp_path / "zeros.txt"
    path.write_bytes(b"\x00" * 4096)
    with pytest.raises(ValueError, match=r"zeros\.txt: holds NUL bytes \(first at byte 0\)"):
        list(iter_documents(path))
    jsonl = tmp_path / "zeros.jsonl"
    jsonl.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": "a\x00b"}) + "\n")
    with pytest.raises(ValueError, match=r"zeros\.jsonl:2: the 'text' holds NUL characters"):
        list(iter_documents(jsonl))


@pytest.mark.parametrize("reader", ["jsonl", "pretrain"])
def test_json_error_column_is_on_the_line(reader: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "no brace"\n')
    # The closing brace is missing: json points at column 20 of line 2. Parsed with the line's
    # newline, it reported column 1 (of the line after it).
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*at column 20\)"):
        if reader == "jsonl":
            list(read_jsonl(path))
        else:
            list(iter_documents(path))


def test_sft_dialogs_with_empty_turns_are_skipped_and_counted(tmp_path: Path) -> None:
    def dialog(user: str, answer: str) -> str:
        return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})

    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join([dialog(f"Question {i}?", f"Answer {i}.") for i in range(6)]
                              + [dialog("Question?", ""), dialog("   ", "An answer.")]) + "\n")
    data = SFTDataModule(sources=[{"path": str(path), "format": "messages"}], tokenizer_path=TOKENIZER,
                         max_seq_len=128, val_fraction=0.2)
    data.setup("fit")
    assert data.stats["empty_dialogs"] == 2
    assert data.stats["dialogs"] == 6
    assert data.stats["train_samples"] + data.stats["val_samples"] == 6


def test_preference_error_prints_the_counts_it_refers_to(tmp_path: Path) -> None:
    from llama2_lightning.data.preference import PreferenceDataModule

    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "chosen": "same", "rejected": "same"})
                              for i in range(4)) + "\n")
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    data = PreferenceDataModule([{"path": str(path), "format": "pairs"}], tokenizer_path=TOKENIZER, max_seq_len=64,
                                val_sources=[{"path": str(val), "format": "pairs"}], val_fraction=0.0)
    with pytest.raises(ValueError, match=r"4 records read, 0 bad lines skipped, 4 with identical answers") as info:
        data.setup("fit")
    assert "see the counts" not in str(info.value)
