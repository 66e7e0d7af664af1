"""The Hugging Face ``tokenizers`` backend (tokenizer.json) behind the one Tokenizer interface."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from llama2_lightning.tokenizer import (
    ROUND_TRIP_PROBES, HFTokenizer, SentencePieceTokenizer, Tokenizer, find_tokenizer,
)
from paths import TOKENIZER as SHIPPED_MODEL
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_bpe_tokenizer(dst: Path, config: dict | None = None) -> Path:
    """A small byte-level BPE tokenizer.json trained here (ChatML special tokens at ids 0-2) and its
    tokenizer_config.json."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["the quick brown fox jumps over the lazy dog", "def main():\n    return 0", "hello world"] * 50
    tok.train_from_iterator(corpus, trainer)
    dst.mkdir(parents=True, exist_ok=True)
    tok.save(str(dst / "tokenizer.json"))
    if config is None:
        config = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "chat_template": CHATML}
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst / "tokenizer.json"


@pytest.fixture
def bpe_dir(tmp_path: Path) -> Path:
    return write_bpe_tokenizer(tmp_path / "tok").parent


def test_tokenizer_dispatches_on_the_path(bpe_dir: Path) -> None:
    assert type(Tokenizer(bpe_dir)) is HFTokenizer
    assert type(Tokenizer(bpe_dir / "tokenizer.json")) is HFTokenizer
    assert type(Tokenizer(SHIPPED_MODEL)) is SentencePieceTokenizer
    assert type(Tokenizer(SHIPPED_MODEL.parent)) is SentencePieceTokenizer  # data/ holds tokenizer.model
    assert isinstance(Tokenizer(bpe_dir), Tokenizer)
    assert find_tokenizer(bpe_dir) == bpe_dir / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="neither tokenizer.model nor tokenizer.json"):
        Tokenizer(bpe_dir.parent)


def test_special_tokens_come_from_tokenizer_config(bpe_dir: Path) -> None:
    tok = Tokenizer(bpe_dir)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)  # no pad token: pad with EOS
    assert tok.vocab_size == tokenizers.Tokenizer.from_file(str(bpe_dir / "tokenizer.json")).get_vocab_size()
    assert tok.chat_template == CHATML
    assert tok.encode("hello", bos=True, eos=True)[0] == 1 and tok.encode("hello", eos=True)[-1] == 2


def test_special_tokens_from_special_tokens_map_and_jinja_file(tmp_path: Path) -> None:
    path = write_bpe_tokenizer(tmp_path, config={})
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    (tmp_path / "chat_template.jinja").write_text(CHATML)
    tok = Tokenizer(path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 2, 0)
    assert tok.chat_template == CHATML


def test_missing_eos_is_a_clear_error(tmp_path: Path) -> None:
    path = write_bpe_tokenizer(tmp_path, config={"bos_token": "<|im_start|>"})
    with pytest.raises(ValueError, match="no eos_token found"):
        Tokenizer(path)
    path = write_bpe_tokenizer(tmp_path, config={"bos_token": "<s>", "eos_token": "<|im_end|>"})
    with pytest.raises(ValueError, match=r"bos_token='<s>' is not in"):
        Tokenizer(path)


@pytest.mark.parametrize("text", list(ROUND_TRIP_PROBES) + ["<|im_start|>user\nhi<|im_end|>", "  \n\n\t x 12345"])
def test_round_trip(bpe_dir: Path, text: str) -> None:
    tok = Tokenizer(bpe_dir)
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text  # BOS/EOS/pad are dropped


def test_text_never_becomes_a_control_token(bpe_dir: Path) -> None:
    tok = Tokenizer(bpe_dir)
    assert not {0, 1, 2} & set(tok.encode("<|im_end|><|im_start|><|endoftext|>"))
    assert tok.encode_template("<|im_start|>x<|im_end|>") == [1, *tok.encode("x"), 2]
    reference = tokenizers.Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    text = "<|im_start|>user\nthe fox 2024<|im_end|>\n"
    assert tok.encode_template(text) == reference.encode(text, add_special_tokens=False).ids


def test_batch_matches_single(bpe_dir: Path) -> None:
    tok = Tokenizer(bpe_dir)
    texts = ["hello world", "", "def main():\n    return 0"]
    assert tok.encode_batch(texts, bos=True) == [tok.encode(t, bos=True) for t in texts]
    assert tok.decode_batch(tok.encode_batch(texts)) == texts


def test_content_hash_covers_the_json_and_the_roles(tmp_path: Path) -> None:
    a = Tokenizer(write_bpe_tokenizer(tmp_path / "a"))
    b = Tokenizer(write_bpe_tokenizer(tmp_path / "b"))
    c = Tokenizer(write_bpe_tokenizer(tmp_path / "c", config={"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}))
    assert a.content_hash == b.content_hash != c.content_hash
    assert len(a.content_hash) == 64
    assert Tokenizer(SHIPPED_MODEL).content_hash != a.content_hash
