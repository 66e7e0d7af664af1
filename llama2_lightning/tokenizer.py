"""SentencePiece tokenizer: Meta's Llama 2 ``tokenizer.model`` or one trained with Llama 2's recipe.

Ids are exactly sentencepiece's, with one deliberate exception. SentencePiece writes spaces as the
meta symbol U+2581 ``▁`` and decodes every ``▁`` back to a space, so a *literal* ``▁`` in the
input would come back as a space. To keep ``decode(encode(text)) == text`` for any text, a literal
``▁`` is encoded as its three UTF-8 byte-fallback pieces (``<0xE2> <0x96> <0x81>``), which
sentencepiece decodes to ``▁`` itself. Text without ``▁`` gets sentencepiece's ids unchanged, and
plain sentencepiece decodes our ids to the same text, so a Meta checkpoint sees valid Llama 2 ids.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from llama2_lightning.files import expand_files
from llama2_lightning.jsonl import text_records

SPACE_SYMBOL = "\u2581"

# Strings that break naive SentencePiece setups (NFKC, whitespace collapsing, dummy prefix):
# train_tokenizer refuses to write a model that does not round-trip all of them.
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


class Tokenizer:
    """A loaded SentencePiece model; ``sp`` is the underlying ``SentencePieceProcessor``."""

    def __init__(self, model_path: str | Path) -> None:
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {self.model_path}")
        # Load from the bytes we hash so content_hash() always describes the model in memory.
        self._model_bytes = self.model_path.read_bytes()
        not_a_model = ValueError(
            f"{self.model_path} is not a SentencePiece model (expected a binary ModelProto such as "
            "Meta's tokenizer.model, or one written by train_tokenizer)"
        )
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=self._model_bytes)
        except RuntimeError as err:
            raise not_a_model from err
        # An empty file parses as an empty ModelProto without error.
        if self.sp.get_piece_size() == 0:
            raise not_a_model
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        # Llama 2 has no pad piece (pad_id = -1). We pad with 0 (<unk>): with byte fallback the
        # encoder never emits <unk>, so padding can't collide with text, and decode() drops it.
        self.pad_id: int = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()
        self._space_bytes, self._sp_no_prefix = self._literal_space_support()

    def _literal_space_support(self) -> tuple[list[int], spm.SentencePieceProcessor | None]:
        byte_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_SYMBOL.encode("utf-8")]
        if not all(self.sp.is_byte(i) for i in byte_ids):
            return [], None  # no byte fallback: nothing exact we can do for a literal ▁
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self._model_bytes)
        if not proto.normalizer_spec.add_dummy_prefix:
            return byte_ids, self.sp
        # Text after a literal ▁ continues the sequence, so it must not get another dummy space.
        proto.normalizer_spec.add_dummy_prefix = False
        return byte_ids, spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def content_hash(self) -> str:
        return hashlib.sha256(self._model_bytes).hexdigest()

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

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]


# ---------------------------------------------------------------------------------------- training


def _expand_inputs(inputs: Iterable[str | Path] | str | Path) -> list[Path]:
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    inputs = list(inputs)
    if not inputs:
        raise ValueError("train_tokenizer needs at least one input file")
    return expand_files(inputs, "tokenizer training input pattern", "tokenizer training input not found")


def _iter_lines(path: Path) -> Iterator[str]:
    """Yield the non-empty lines of a text or JSONL (``text`` field) file, optionally gzipped.

    SentencePiece trains on lines, so "\n" never enters the vocabulary: like Llama 2, newlines are
    encoded with the byte-fallback piece <0x0A>. Lines split on "\n" only, so a "\r" stays text.
    """
    count = 0
    if ".jsonl" in path.suffixes:
        pieces: Iterator[str] = (piece for _, text in text_records(path) for piece in text.split("\n"))
    else:
        pieces = _plain_lines(path)
    for piece in pieces:
        if piece:
            count += 1
            yield piece
    if count == 0:
        raise ValueError(f"tokenizer training input {path} contains no text")


def _plain_lines(path: Path) -> Iterator[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                yield raw.decode("utf-8").removesuffix("\n")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text ({err.reason})") from err


def _sample_lines(files: list[Path], limit: int, seed: int) -> list[str]:
    # Reservoir sampling in Python (not sentencepiece's shuffler) bounds memory and makes the
    # sample depend only on the files and the seed.
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    for path in files:
        for line in _iter_lines(path):
            seen += 1
            if len(sample) < limit:
                sample.append(line)
            else:
                j = rng.randrange(seen)
                if j < limit:
                    sample[j] = line
    return sample


def train_tokenizer(
    inputs: Iterable[str | Path] | str | Path,
    output: str | Path,
    vocab_size: int = 2048,
    input_sentence_size: int = 1_000_000,
    seed: int = 0,
) -> Tokenizer:
    """Train a SentencePiece BPE model with Llama 2's trainer options and write it to ``output``.

    ``inputs`` are files or glob patterns: UTF-8 text (one sentence per line) or ``.jsonl`` with a
    ``text`` field, optionally gzipped. At most ``input_sentence_size`` lines (a seeded sample)
    are used. The result is byte-identical for the same inputs and arguments.
    """
    files = _expand_inputs(inputs)
    output = Path(output)
    lines = _sample_lines(files, input_sentence_size, seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            # Llama 2's choices (see the trainer_spec stored in Meta's tokenizer.model):
            byte_fallback=True,  # unseen characters become UTF-8 bytes, never <unk>
            split_digits=True,  # every digit is its own piece, for arithmetic
            character_coverage=0.99995,  # rare characters fall back to bytes
            allow_whitespace_only_pieces=True,  # runs of spaces (code indentation) get pieces
            max_sentencepiece_length=16,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            unk_piece="<unk>",
            bos_piece="<s>",
            eos_piece="</s>",
            # Exact round trip: no NFKC (it rewrites ligatures, fullwidth forms, ...) and no
            # whitespace collapsing. The dummy prefix stays (as in Llama): decode removes exactly
            # the one space encode added, so leading spaces survive.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            max_sentence_length=1 << 16,
            input_sentence_size=0,  # already sampled above
            shuffle_input_sentence=False,
            # Recorded in the model file; BPE merges do not depend on it, so fix it for
            # byte-identical output (and a stable content_hash) across machines.
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise ValueError(
            f"SentencePiece training on {len(lines)} lines from {[str(f) for f in files]} failed: {err}"
        ) from err

    output.parent.mkdir(parents=True, exist_ok=True)
    # Same directory so os.replace is atomic; open(..., "xb") (unlike mkstemp) honours the umask.
    tmp = output.with_name(f".{output.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as handle:
            handle.write(model.getvalue())
        tokenizer = Tokenizer(tmp)
        _check_round_trip(tokenizer, [*ROUND_TRIP_PROBES, *lines[:100]])
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Tokenizer(output)


def _check_round_trip(tokenizer: Tokenizer, texts: Iterable[str]) -> None:
    for text in texts:
        decoded = tokenizer.decode(tokenizer.encode(text))
        if decoded != text:
            raise RuntimeError(f"trained tokenizer does not round-trip {text!r} (decoded {decoded!r})")
