"""Fuzzing the data loaders with hostile and careless files: random bytes, truncated gzip, and valid
records with a random JSON value in each field. Every outcome must be a ValueError naming the file
(and, for a bad record, its line), or the record skipped and counted; never a raw IndexError,
KeyError, TypeError or AttributeError from inside the library."""

from __future__ import annotations

import gzip
import json
import random
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llama2_lightning.data.preference import PreferenceDataModule
from llama2_lightning.data.pretrain import iter_documents
from llama2_lightning.data.prompts import PromptSource, read_prompt_source
from llama2_lightning.data.sft import SFTSource, read_source
from llama2_lightning.jsonl import read_jsonl
from llama2_lightning.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = Tokenizer(ROOT / "data" / "tokenizer.model")

TEMPLATES: dict[str, dict[str, Any]] = {
    "messages": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
    "self_instruct": {"id": "t1", "instruction": "Add.", "instances": [{"input": "1 2", "output": "3"}]},
    "hh_chosen": {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: No."},
    "prompts": {"prompt": "Tell me a joke.", "is_safety": False},
    "text": {"text": "Some document."},
    "pairs": {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away.", "label": "better"},
}


def _preference(path: Path, mode: str) -> None:
    data = PreferenceDataModule([{"path": str(path), "format": "pairs"}], tokenizer_path=str(ROOT / "data" / "tokenizer.model"),
                                max_seq_len=64, val_fraction=0.5, on_bad_line=mode)
    data.setup("fit")


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["null", "bool", "int", "float", "str", "empty"] + (["list", "dict"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "null":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice([0, -1, 1, 2**63, rng.randrange(-1000, 1000)])
    if kind == "float":
        return rng.choice([0.5, -1e308, 1e-9])
    if kind == "str":
        return rng.choice(["", " ", "user", "assistant", "system", "\x00", "x" * 50, "\n\nHuman:"])
    if kind == "empty":
        return rng.choice([[], {}])
    if kind == "list":
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {rng.choice(["role", "content", "input", "output", "x"]): _random_json(rng, depth + 1)
            for _ in range(rng.randrange(3))}


def _mutations(template: dict[str, Any], rng: random.Random) -> list[dict[str, Any]]:
    """The template with one field (top level, or inside a list element) replaced by a random value."""
    out = []
    for key in template:
        for _ in range(3):
            record = json.loads(json.dumps(template))
            value = record[key]
            if isinstance(value, list) and value and isinstance(value[0], dict) and rng.random() < 0.6:
                element = rng.choice(value)
                element[rng.choice(sorted(element))] = _random_json(rng)
            else:
                record[key] = _random_json(rng)
            out.append(record)
    return out


def _files(tmp_path: Path, template: dict[str, Any], suffix: str, seed: int) -> list[Path]:
    rng = random.Random(seed)
    files = []
    valid = "\n".join(json.dumps(template) for _ in range(5)) + "\n"
    for i, record in enumerate(_mutations(template, rng)):
        path = tmp_path / f"mut{i}{suffix}"
        path.write_text(json.dumps(template) + "\n" + json.dumps(record) + "\n")
        files.append(path)
    for i in range(4):
        path = tmp_path / f"bytes{i}{suffix}"
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))))
        files.append(path)
    for i in range(3):
        path = tmp_path / f"trunc{i}{suffix}.gz"
        whole = gzip.compress(valid.encode() * 50)
        path.write_bytes(whole[: rng.randrange(10, len(whole) - 1)])
        files.append(path)
    json_values = tmp_path / f"values{suffix}"
    json_values.write_text("\n".join(json.dumps(_random_json(rng)) for _ in range(6)) + "\n")
    files.append(json_values)
    return files


def _check(load: Callable[[Path], Any], path: Path) -> None:
    try:
        load(path)
    except ValueError as err:  # the project's errors (and UnicodeDecodeError's parent) are ValueErrors
        assert str(path) in str(err), f"{type(err).__name__} does not name the file: {err}"
    except FileNotFoundError as err:
        pytest.fail(f"{path}: {err}")


LOADERS: dict[str, tuple[str, str, Callable[[Path, str], Any]]] = {
    # name: (template, suffix, load(path, on_bad_line))
    "jsonl": ("messages", ".jsonl", lambda p, mode: list(read_jsonl(p, mode))),
    "pretrain-jsonl": ("text", ".jsonl", lambda p, mode: list(iter_documents(p))),
    "pretrain-text": ("text", ".txt", lambda p, mode: list(iter_documents(p))),
    **{f"sft-{fmt}": (fmt, ".jsonl", (lambda f: lambda p, mode: read_source(SFTSource(str(p), f), mode, TOKENIZER))(fmt))
       for fmt in ("messages", "self_instruct", "hh_chosen")},
    "prompts": ("prompts", ".jsonl", lambda p, mode: read_prompt_source(PromptSource(p, "prompts"), 0, mode)),
    "preference-pairs": ("pairs", ".jsonl", _preference),
}


@pytest.mark.parametrize("mode", ["error", "skip"])
@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_every_outcome_is_a_clear_error_or_a_counted_skip(loader: str, mode: str, tmp_path: Path) -> None:
    template, suffix, load = LOADERS[loader]
    for path in _files(tmp_path, TEMPLATES[template], suffix, seed=zlib.crc32(loader.encode())):
        _check(lambda p: load(p, mode), path)
