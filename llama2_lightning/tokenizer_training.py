"""Training a SentencePiece BPE tokenizer with Llama 2's recipe (the ``tokenizer train`` command)."""

from __future__ import annotations

import gzip
import io
import os
import random
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from llama2_lightning.files import expand_files
from llama2_lightning.jsonl import text_records
from llama2_lightning.tokenizer import ROUND_TRIP_PROBES, SentencePieceTokenizer

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
) -> SentencePieceTokenizer:
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
        tokenizer = SentencePieceTokenizer(tmp)
        _check_round_trip(tokenizer, [*ROUND_TRIP_PROBES, *lines[:100]])
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return SentencePieceTokenizer(output)


def _check_round_trip(tokenizer: SentencePieceTokenizer, texts: Iterable[str]) -> None:
    for text in texts:
        decoded = tokenizer.decode(tokenizer.encode(text))
        if decoded != text:
            raise RuntimeError(f"trained tokenizer does not round-trip {text!r} (decoded {decoded!r})")
