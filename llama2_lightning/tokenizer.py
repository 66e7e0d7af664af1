"""One tokenizer interface, two backends: SentencePiece (``tokenizer.model``: Llama 2, models trained
here) and Hugging Face ``tokenizers`` (``tokenizer.json``: byte-level BPE as in Llama 3, SmolLM,
most current Llama-family models; also built on the fly from a ``.gguf`` file's vocabulary).

``Tokenizer(path)`` picks the backend from ``path``: a ``.model`` file, a ``tokenizer.json`` (its
special tokens come from the ``tokenizer_config.json`` / ``special_tokens_map.json`` beside it), a
``.gguf`` file, or a directory holding one of those. Both backends keep ``decode(encode(text)) == text``:
``encode`` treats its text as text, so a literal ``<|im_end|>`` or ``<s>`` in user content never becomes a
control token; only :meth:`Tokenizer.encode_template` (for rendered chat templates) parses special tokens.

SentencePiece ids are exactly sentencepiece's, with one deliberate exception. SentencePiece writes
spaces as the meta symbol U+2581 ``▁`` and decodes every ``▁`` back to a space, so a *literal* ``▁``
would come back as a space. To keep the round trip exact, a literal ``▁`` is encoded as its three
UTF-8 byte-fallback pieces (``<0xE2> <0x96> <0x81>``), which sentencepiece decodes to ``▁`` itself.
Text without ``▁`` gets sentencepiece's ids unchanged, so a Meta checkpoint sees valid Llama 2 ids.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2

from llama2_lightning.tokenizer_files import gguf_tokenizer_json, read_special_tokens

SPACE_SYMBOL = "\u2581"

# Strings that break naive tokenizer setups (NFKC, whitespace collapsing, dummy prefix): every
# backend must round-trip them, and train_tokenizer refuses a model that does not.
ROUND_TRIP_PROBES: tuple[str, ...] = (
    "",
    " ",
    "  ",
    "\n",
    "\n\n",
    "\t",
    "hello",
    " hello",
    "  hello  ",
    "hello ",
    "a\tb\t\tc",
    "a  b   c    d",
    "line one\n\nline two\r\n",
    "\n leading newline",
    "Emoji 😀🦙 and ZWJ 👩\u200d💻",
    "日本語のテキスト、中文文本。한국어",
    "digits 1234567890 and 3.14159",
    "ﬁ ligature, Ａ fullwidth, e\u0301 combining, \u00a0nbsp, \ufeffbom",
    "literal \u2581 meta symbol\u2581",
    "\u2581",
    "\x00\x07\x7f control bytes",
)


def resolve_tokenizer_path(path: str | os.PathLike[str]) -> Path:
    """The tokenizer file ``path`` names: itself if a file, else ``tokenizer.model`` or
    ``tokenizer.json`` inside the directory (in that order)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for name in ("tokenizer.model", "tokenizer.json"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: directory holds neither tokenizer.model nor tokenizer.json")
    raise FileNotFoundError(f"tokenizer model not found: {path}")


def find_tokenizer(checkpoint: str | os.PathLike[str]) -> Path | None:
    """The tokenizer that travels with a checkpoint: inside its directory, beside its file, or the
    ``.gguf`` itself (whose metadata holds the vocabulary); ``None`` if there is none."""
    checkpoint = Path(checkpoint)
    if checkpoint.suffix == ".gguf" and checkpoint.is_file():
        return checkpoint
    for base in ([checkpoint] if checkpoint.is_dir() else []) + [checkpoint.parent]:
        for name in ("tokenizer.model", "tokenizer.json"):
            if (base / name).is_file():
                return base / name
    return None


class Tokenizer:
    """The interface every backend provides. ``Tokenizer(path)`` returns the backend for ``path``.

    Attributes: ``model_path`` (the file loaded), ``bos_id``, ``eos_id``, ``pad_id`` (padding id,
    dropped by ``decode``), ``vocab_size``, ``content_hash`` (sha256 of what decides the ids), and
    ``chat_template`` (the model's own Jinja chat template, or ``None``), and ``add_bos`` (whether the
    model expects BOS before plain text: Llama's do, SmolLM2 (whose "BOS" is ChatML's ``<|im_start|>``)
    does not)."""

    model_path: Path
    bos_id: int
    eos_id: int
    pad_id: int
    chat_template: str | None = None
    add_bos: bool = True

    def __new__(cls, *args: Any, **kwargs: Any) -> Tokenizer:
        if cls is Tokenizer:
            if not args and "model_path" not in kwargs:
                raise TypeError("Tokenizer(path): a tokenizer.model, tokenizer.json, .gguf or directory")
            path = resolve_tokenizer_path(args[0] if args else kwargs["model_path"])
            cls = HFTokenizer if path.suffix in (".json", ".gguf") else SentencePieceTokenizer
        return super().__new__(cls)

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def content_hash(self) -> str:
        raise NotImplementedError

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        raise NotImplementedError

    def encode_template(self, text: str) -> list[int]:
        """Ids of a rendered chat template, in which the backend's special tokens are control tokens."""
        return self.encode_template_offsets(text)[0]

    def encode_template_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """:meth:`encode_template`'s ids and each token's (start, end) character span in ``text``."""
        raise ValueError(f"{self.model_path}: chat templates need a tokenizer.json tokenizer "
                         "(a SentencePiece model parses no special tokens in text); use the Llama 2 format")

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        return [self.encode(t, bos=bos, eos=eos) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    """A loaded SentencePiece model; ``sp`` is the underlying ``SentencePieceProcessor``."""

    def __init__(self, model_path: str | os.PathLike[str]) -> None:
        self.model_path = resolve_tokenizer_path(model_path)
        # Load from the bytes we hash so content_hash always describes the model in memory.
        self.model_bytes = self.model_path.read_bytes()
        not_a_model = ValueError(
            f"{self.model_path} is not a SentencePiece model (expected a binary ModelProto such as "
            "Meta's tokenizer.model, or one written by train_tokenizer)"
        )
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)
        except RuntimeError as err:
            raise not_a_model from err
        # An empty file parses as an empty ModelProto without error.
        if self.sp.get_piece_size() == 0:
            raise not_a_model
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        # Llama 2 has no pad piece (pad_id = -1). We pad with 0 (<unk>): with byte fallback the
        # encoder never emits <unk>, so padding can't collide with text, and decode() drops it.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()
        self._space_bytes, self._sp_no_prefix = self._literal_space_support()

    def _literal_space_support(self) -> tuple[list[int], spm.SentencePieceProcessor | None]:
        byte_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_SYMBOL.encode("utf-8")]
        if not all(self.sp.is_byte(i) for i in byte_ids):
            return [], None  # no byte fallback: nothing exact we can do for a literal ▁
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.model_bytes)
        if not proto.normalizer_spec.add_dummy_prefix:
            return byte_ids, self.sp
        # Text after a literal ▁ continues the sequence, so it must not get another dummy space.
        proto.normalizer_spec.add_dummy_prefix = False
        return byte_ids, spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(self.model_bytes).hexdigest()

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)  # unknown pieces map to <unk>'s id
        return i if self.sp.id_to_piece(i) == token else None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        if SPACE_SYMBOL in text and self._sp_no_prefix is not None:
            ids = self._encode_literal_space(text)
        else:
            ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def _encode_literal_space(self, text: str) -> list[int]:
        assert self._sp_no_prefix is not None
        first, *rest = text.split(SPACE_SYMBOL)
        ids = self.sp.encode(first)
        for segment in rest:
            ids += self._space_bytes
            if segment:
                ids += self._sp_no_prefix.encode(segment)
        return ids

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        texts = list(texts)
        special = {i for i, t in enumerate(texts) if SPACE_SYMBOL in t and self._sp_no_prefix is not None}
        plain = [i for i in range(len(texts)) if i not in special]
        out: list[list[int]] = [[] for _ in texts]
        # sentencepiece's list encode runs in its own thread pool, outside the GIL.
        for i, ids in zip(plain, self.sp.encode([texts[i] for i in plain], add_bos=bos, add_eos=eos)):
            out[i] = ids
        for i in special:
            out[i] = self.encode(texts[i], bos=bos, eos=eos)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        # int() accepts tensors/numpy scalars; pad ids are dropped so padded rows decode cleanly
        # (bos/eos/pad pieces are control pieces that sentencepiece already renders as "").
        return self.sp.decode([i for i in map(int, ids) if i != self.pad_id])


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` model: a ``tokenizer.json`` (special tokens and chat template from
    the files beside it) or a ``.gguf`` whose vocabulary and merges are turned into one."""

    def __init__(self, model_path: str | os.PathLike[str]) -> None:
        self.model_path = resolve_tokenizer_path(model_path)
        if self.model_path.suffix == ".gguf":
            text, special = gguf_tokenizer_json(self.model_path)
        else:
            text = self.model_path.read_text(encoding="utf-8")
            special = read_special_tokens(self.model_path.parent)
        self.tokenizer_json = text
        try:
            self.hf = tokenizers.Tokenizer.from_str(text)
        except Exception as err:  # the Rust library raises plain Exception for a malformed file
            raise ValueError(f"{self.model_path} is not a Hugging Face tokenizer.json: {err}") from err
        # A second copy that treats special-token strings as ordinary text, for encode().
        self._text_only = tokenizers.Tokenizer.from_str(text)
        self._text_only.encode_special_tokens = True
        ids = {}
        for role in ("bos_token", "eos_token", "pad_token"):
            token = special.get(role)
            if token is None:
                continue
            ids[role] = self.hf.token_to_id(token)
            if ids[role] is None:
                raise ValueError(f"{special['source']}: {role}={token!r} is not in {self.model_path}'s vocabulary")
        for role in ("bos_token", "eos_token"):
            if role not in ids:
                raise ValueError(f"{self.model_path}: no {role} found (looked in {special['source']}); "
                                 f"add \"{role}\" to tokenizer_config.json")
        self.bos_id, self.eos_id = ids["bos_token"], ids["eos_token"]
        # Models without a pad token pad with EOS (the ecosystem's habit); decode drops both.
        self.pad_id = ids.get("pad_token", self.eos_id)
        self.chat_template = special.get("chat_template")
        add_bos = special.get("add_bos_token")
        # Without a flag, follow the tokenizer.json's own post-processor (Llama 3's inserts BOS).
        self.add_bos = bool(add_bos) if add_bos is not None else self.hf.encode("a").ids[:1] == [self.bos_id]

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def content_hash(self) -> str:
        # The ids depend on the JSON and on which tokens are BOS/EOS/pad.
        roles = f"\0{self.bos_id},{self.eos_id},{self.pad_id}".encode()
        return hashlib.sha256(self.tokenizer_json.encode("utf-8") + roles).hexdigest()

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._text_only.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_template_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = self.hf.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        encoded = self._text_only.encode_batch(list(texts), add_special_tokens=False)
        return [([self.bos_id] if bos else []) + e.ids + ([self.eos_id] if eos else []) for e in encoded]

    def decode(self, ids: Iterable[int]) -> str:
        control = {self.bos_id, self.eos_id, self.pad_id}
        return self.hf.decode([i for i in map(int, ids) if i not in control], skip_special_tokens=False)
