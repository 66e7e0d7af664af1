"""Pretraining text as a token file on disk: reading documents (plain text or JSONL, optionally gzipped),
tokenising them once, and a cache keyed by the inputs' and the tokenizer's content."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import uuid
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llama2_lightning.files import expand_files
from llama2_lightning.jsonl import text_records
from llama2_lightning.tokenizer import Tokenizer

# Bump when the token file layout or the document rules change, so old caches are not reused.
FORMAT_VERSION = 1

# JSONL documents are tokenised this many at a time: sentencepiece's batch encode is
# multi-threaded, and the batch bounds memory for very large files.
_ENCODE_BATCH = 1024
def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of a ``vocab_size`` vocabulary."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def resolve_files(train_files: Sequence[str] | str) -> list[Path]:
    """Expand globs (sorted, so the stream order is reproducible) and check every file exists."""
    patterns = [train_files] if isinstance(train_files, str) else list(train_files)
    if not patterns:
        raise ValueError("train_files is empty: give at least one file or glob pattern")
    return expand_files(patterns, "train_files pattern", "training data file not found")


def _is_jsonl(path: Path) -> bool:
    return ".jsonl" in path.suffixes


def _open_bytes(path: Path) -> Any:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def iter_documents(path: Path) -> Iterator[str]:
    """Yield the documents of one input file, raising ``ValueError`` naming the file (and line)."""
    if ".json" in path.suffixes:
        # Read as text it would be one document of JSON syntax; as JSON it is ambiguous (an array?
        # JSONL under the wrong name?): refuse and say how to name it.
        raise ValueError(f"{path}: a .json file is neither plain text nor JSONL here; rename it .jsonl if it holds "
                         "one {\"text\": ...} object per line, or .txt to train on it as one text document")
    try:
        if _is_jsonl(path):
            yield from _iter_jsonl(path)
            return
        with _open_bytes(path) as handle:
            raw = handle.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: not a readable gzip file, truncated or corrupt ({err})") from err
    if not raw:
        raise ValueError(f"{path}: file is empty")
    if b"\x00" in raw:
        # UTF-8 text never holds NUL; such a file is binary (or UTF-16) and would train on byte tokens.
        raise ValueError(f"{path}: holds NUL bytes (first at byte {raw.index(0)}): a binary or UTF-16 file, "
                         "not UTF-8 text")
    try:
        yield raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid UTF-8 at byte {err.start} ({err.reason})") from err


def _iter_jsonl(path: Path) -> Iterator[str]:
    count = 0
    for _, text in text_records(path):
        count += 1
        yield text
    if count == 0:
        raise ValueError(f"{path}: file is empty (no JSONL records)")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(files: Sequence[Path], tokenizer_hash: str) -> str:
    """Key of the token file: input contents in order, how each is parsed, the tokenizer, the format."""
    # The parse mode is part of the key: the same bytes read as text or as JSONL are different streams.
    inputs = [["jsonl" if _is_jsonl(f) else "text", f.suffix == ".gz", file_digest(f)] for f in files]
    payload = json.dumps({"version": FORMAT_VERSION, "tokenizer": tokenizer_hash, "inputs": inputs})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def build_token_file(files: Sequence[Path], tokenizer: Tokenizer, out_path: Path) -> dict[str, Any]:
    """Tokenise ``files`` into ``out_path`` (ids + EOS per document); return the sidecar metadata.

    Streams one document (or one JSONL batch) at a time so memory does not grow with the corpus,
    and writes to a unique temporary name first so a crash or a concurrent writer (several nodes
    sharing a filesystem) never leaves a half-written file under the final name.
    """
    dtype = token_dtype(tokenizer.vocab_size)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{uuid.uuid4().hex}.tmp")
    num_tokens = num_bytes = num_docs = 0
    try:
        with open(tmp, "xb") as out:

            def write(texts: list[str]) -> None:
                nonlocal num_tokens, num_bytes, num_docs
                for ids in tokenizer.encode_batch(texts, eos=True):
                    np.asarray(ids, dtype=dtype).tofile(out)
                    num_tokens += len(ids)
                num_bytes += sum(len(t.encode("utf-8")) for t in texts)
                num_docs += len(texts)

            for path in files:
                docs = iter_documents(path)
                while batch := list(itertools.islice(docs, _ENCODE_BATCH)):
                    write(batch)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "num_tokens": num_tokens,
        "num_bytes": num_bytes,
        "num_documents": num_docs,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "tokenizer": str(tokenizer.model_path),
        "inputs": [str(f) for f in files],  # informative only: the key ignores paths
    }


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_cache(bin_path: Path, meta_path: Path) -> dict[str, Any] | None:
    """The sidecar if the cache entry is complete and consistent, else None (rebuild)."""
    if not (bin_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        expected = meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize
    except (ValueError, KeyError, TypeError):
        return None
    if meta.get("format_version") != FORMAT_VERSION or bin_path.stat().st_size != expected:
        return None
    return meta
