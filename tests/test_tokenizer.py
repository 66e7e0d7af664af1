from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from paths import SHAKESPEARE, TOKENIZER

from llama2_lightning.commands.tokenizer import cli_tokenizer
from llama2_lightning.tokenizer import ROUND_TRIP_PROBES, Tokenizer
from llama2_lightning.tokenizer_training import train_tokenizer

SHIPPED_MODEL = TOKENIZER

# Whitespace, control characters, scripts and symbols that normalisation or whitespace handling
# could alter; none contains the literal meta symbol U+2581 (tested separately).
VARIED = [
    "Hello world",
    "hello",
    " hello",
    "  two leading spaces",
    "trailing spaces  ",
    "a  b   c    d",
    "\ttab\tseparated\t\tcolumns",
    "line one\nline two\n\nparagraph\n",
    "\n\nleading newlines",
    "windows\r\nline endings\r\n",
    "def f(x):\n    return x + 1\n",
    "The year 2023 had 365 days; pi is 3.14159.",
    "Emoji 😀🦙👩\u200d💻 and flags 🇫🇷",
    "日本語のテキストと中文文本，한국어도。",
    "Ünïcödé àccents, e\u0301 combining, ﬁ ligature, Ａ fullwidth, \u00a0nbsp",
    "Ω≈ç√∫˜µ≤≥÷ mathematical ∑ symbols",
    "\x00\x07\x7f control characters",
    "",
    " ",
    "   ",
    "\n",
]

TRICKY = [
    *VARIED,
    "\t",
    "  ",
    "\n\n",
    " \n \n ",
    "x\t \t y",
    "    indented code block",
    "🦙",
    "中文",
    "0123456789 9876543210",
    "\u2581 literal meta symbol \u2581\u2581x",
]


def _corpus_lines() -> list[str]:
    # ~100 KB of real text plus digits, tabs and indentation so every trainer option has something
    # to act on; small enough that training takes well under a second.
    text = SHAKESPEARE.read_text(encoding="utf-8")[:100_000]
    extra = [f"In {1500 + i} there were {i * 37} players\tand {i % 9} acts." for i in range(300)]
    extra += ["    if x:\n        return y"] * 50
    return text.split("\n") + extra


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    tmp = tmp_path_factory.mktemp("tok")
    lines = _corpus_lines()
    (tmp / "corpus.txt").write_text("\n".join(lines[: len(lines) // 2]), encoding="utf-8")
    with open(tmp / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i in range(len(lines) // 2, len(lines), 20):
            f.write(json.dumps({"text": "\n".join(lines[i : i + 20])}) + "\n")
    return train_tokenizer([tmp / "corpus.txt", tmp / "corpus.jsonl"], tmp / "out" / "small.model", vocab_size=512)


def _model_proto(path: Path) -> sentencepiece_model_pb2.ModelProto:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto


# ------------------------------------------------------------------------------ Meta's tokenizer


def test_meta_tokenizer_ids_match_sentencepiece(llama_tokenizer_path: Path) -> None:
    tok = Tokenizer(llama_tokenizer_path)
    sp = spm.SentencePieceProcessor(model_file=str(llama_tokenizer_path))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 0, 32000)
    for text in VARIED:
        ids = tok.encode(text)
        assert ids == sp.encode(text), text
        assert tok.encode(text, bos=True, eos=True) == [1, *ids, 2]
        assert tok.decode(ids) == text == sp.decode(ids)
    # A known Llama 2 encoding (also what transformers' LlamaTokenizer gives).
    assert tok.encode("Hello world", bos=True) == [1, 15043, 3186]


def test_literal_meta_symbol_round_trips_with_meta_tokenizer(llama_tokenizer_path: Path) -> None:
    tok = Tokenizer(llama_tokenizer_path)
    sp = spm.SentencePieceProcessor(model_file=str(llama_tokenizer_path))
    text = "a\u2581b \u2581"
    assert sp.decode(sp.encode(text)) != text  # plain sentencepiece turns the ▁ into a space
    ids = tok.encode(text)
    space_bytes = [sp.piece_to_id(p) for p in ("<0xE2>", "<0x96>", "<0x81>")]
    assert ids[1:4] == space_bytes
    # Plain sentencepiece decodes our ids back to the exact text, so they are valid Llama 2 input.
    assert tok.decode(ids) == text == sp.decode(ids)


def test_trained_options_match_meta_tokenizer(trained: Tokenizer, llama_tokenizer_path: Path) -> None:
    ours, meta = _model_proto(trained.model_path), _model_proto(llama_tokenizer_path)
    for field in (
        "model_type", "byte_fallback", "split_digits", "character_coverage", "allow_whitespace_only_pieces",
        "max_sentencepiece_length", "split_by_whitespace", "split_by_number", "split_by_unicode_script",
        "unk_id", "bos_id", "eos_id", "pad_id", "unk_piece", "bos_piece", "eos_piece",
    ):  # fmt: skip
        assert getattr(ours.trainer_spec, field) == getattr(meta.trainer_spec, field), field
    for field in ("name", "add_dummy_prefix", "remove_extra_whitespaces", "escape_whitespaces"):
        assert getattr(ours.normalizer_spec, field) == getattr(meta.normalizer_spec, field), field
    # Same layout of the first ids: 3 specials then the 256 byte pieces.
    assert [p.piece for p in ours.pieces[:259]] == [p.piece for p in meta.pieces[:259]]


# ------------------------------------------------------------------------------ trained tokenizer


def test_trained_tokenizer_layout(trained: Tokenizer) -> None:
    assert trained.model_path.is_file()
    assert trained.vocab_size == 512
    assert [trained.sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert (trained.bos_id, trained.eos_id, trained.pad_id) == (1, 2, 0)
    assert trained.sp.pad_id() == -1  # no pad piece, as in Llama 2
    assert trained.sp.id_to_piece(3) == "<0x00>" and trained.sp.id_to_piece(258) == "<0xFF>"
    # Only the model is written: no .vocab file, no temporary file left behind.
    assert sorted(p.name for p in trained.model_path.parent.iterdir()) == ["small.model"]


@pytest.mark.parametrize("text", TRICKY + list(ROUND_TRIP_PROBES))
def test_trained_tokenizer_round_trips_exactly(trained: Tokenizer, text: str) -> None:
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    assert 0 not in ids  # byte fallback: never <unk>


def test_trained_tokenizer_learned_merges_and_digits(trained: Tokenizer) -> None:
    pieces = trained.sp.id_to_piece(trained.encode("the king of England in 1066 and 2024"))
    assert {"▁the", "▁of", "▁and"} <= set(pieces)  # it learned words, not only characters
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digits == list("10662024")  # each digit its own (learned, not byte) piece


def test_unseen_characters_fall_back_to_bytes(trained: Tokenizer) -> None:
    text = "Ωψ ∑ 😀 中"
    assert not any(c in SHAKESPEARE.read_text(encoding="utf-8")[:100_000] for c in "Ωψ∑😀中")
    ids = trained.encode(text)
    assert 0 not in ids
    assert len([i for i in ids if trained.sp.is_byte(i)]) == len("".join(text.split()).encode("utf-8"))
    assert trained.decode(ids) == text


def test_training_is_deterministic(trained: Tokenizer, tmp_path: Path) -> None:
    lines = _corpus_lines()
    (tmp_path / "a.txt").write_text("\n".join(lines), encoding="utf-8")
    first = train_tokenizer(tmp_path / "a.txt", tmp_path / "1.model", vocab_size=400)
    second = train_tokenizer(str(tmp_path / "*.txt"), tmp_path / "2.model", vocab_size=400)
    assert first.model_path.read_bytes() == second.model_path.read_bytes()
    assert first.content_hash == second.content_hash
    assert first.content_hash != trained.content_hash


def test_failed_training_leaves_no_file(tmp_path: Path) -> None:
    (tmp_path / "tiny.txt").write_text("just a few words\n", encoding="utf-8")
    with pytest.raises(ValueError, match="tiny.txt"):
        train_tokenizer(tmp_path / "tiny.txt", tmp_path / "out.model", vocab_size=50_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.txt"]


def test_training_input_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_tokenizer(tmp_path / "missing.txt", tmp_path / "o.model")
    with pytest.raises(FileNotFoundError, match=r"nothing\*\.txt"):
        train_tokenizer(str(tmp_path / "nothing*.txt"), tmp_path / "o.model")
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt contains no text"):
        train_tokenizer(tmp_path / "empty.txt", tmp_path / "o.model")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"content": "no text field"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        train_tokenizer(tmp_path / "bad.jsonl", tmp_path / "o.model")
    assert not (tmp_path / "o.model").exists()


# ------------------------------------------------------------------------------ shipped model, API


def test_shipped_tokenizer_round_trips_shakespeare() -> None:
    tok = Tokenizer(SHIPPED_MODEL)
    assert tok.vocab_size == 2048
    assert tok.content_hash == hashlib.sha256(SHIPPED_MODEL.read_bytes()).hexdigest()
    passage = SHAKESPEARE.read_text(encoding="utf-8")[:3000]
    ids = tok.encode(passage, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and 0 not in ids
    assert len(ids) < len(passage) / 2.5  # real merges, not characters
    assert tok.decode(ids) == passage


def test_batch_matches_single_and_decode_drops_padding() -> None:
    tok = Tokenizer(SHIPPED_MODEL)
    texts = [*TRICKY, "To be, or not to be"]
    batch = tok.encode_batch(texts, bos=True, eos=True)
    assert batch == [tok.encode(t, bos=True, eos=True) for t in texts]
    assert tok.decode_batch(batch) == texts
    padded = [ids + [tok.pad_id] * 3 for ids in batch]
    assert tok.decode_batch(padded) == texts


def test_model_file_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no_such.model"):
        Tokenizer(tmp_path / "no_such.model")
    for name, data in (("garbage.model", b"this is not a protobuf"), ("empty.model", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"{name} is not a SentencePiece model"):
            Tokenizer(tmp_path / name)


def test_cli_reproduces_shipped_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The exact command data/README.md documents, writing elsewhere.
    out = tmp_path / "tokenizer.model"
    argv = ["train", "--input", str(SHAKESPEARE), "--output", str(out), "--vocab-size", "2048"]
    assert cli_tokenizer(argv) == 0
    stdout = capsys.readouterr().out
    assert str(out) in stdout and "2048" in stdout
    assert out.read_bytes() == SHIPPED_MODEL.read_bytes()


def test_cli_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--input", str(tmp_path / "absent.txt"), "--output", str(tmp_path / "t.model")]
    assert cli_tokenizer(argv) == 1
    assert "absent.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_tokenizer(["train", "--output", "x.model"])  # --input is required
