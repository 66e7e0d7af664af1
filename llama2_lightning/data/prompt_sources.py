"""Prompt files as prompts: the ``sources`` entries of a prompt data module and the formats they name
(JSONL prompts, HH-RLHF first turns, XSTest, self-instruct)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llama2_lightning.chat import Message
from llama2_lightning.data.readers import parse_hh_dialog, self_instruct_to_dialogs
from llama2_lightning.data.sources import source_entries
from llama2_lightning.jsonl import read_jsonl

# ---------------------------------------------------------------------------------------------- sources

PromptFormat = Literal["prompts", "hh", "xstest", "self_instruct"]
PROMPT_FORMATS: tuple[str, ...] = ("prompts", "hh", "xstest", "self_instruct")
_SOURCE_KEYS = ("path", "format", "is_safety", "name", "limit", "label")
XSTEST_COLUMNS = ("id", "prompt", "type", "label", "focus", "note")


@dataclass(frozen=True)
class PromptSource:
    """One validated entry of ``sources`` / ``val_sources``."""

    path: Path
    format: PromptFormat = "prompts"
    is_safety: bool | None = None
    name: str = ""
    limit: int | None = None
    label: Literal["safe", "unsafe"] | None = None  # XSTest only: keep one half


def parse_prompt_sources(sources: Sequence[Mapping[str, Any]], key: str = "sources") -> list[PromptSource]:
    """Validate a config's list of source dicts; errors name the entry, the key and the allowed values."""
    specs: list[PromptSource] = []
    for e in source_entries(sources, key, _SOURCE_KEYS, PROMPT_FORMATS, "prompts"):
        if e.format == "hh" and e.is_safety is None:
            raise ValueError(f"{e.where}: an hh source needs is_safety (true for the harmless file, false for the "
                             "helpful one); the file itself does not say which it is")
        label = e.raw.get("label")
        if label is not None and (e.format != "xstest" or label not in ("safe", "unsafe")):
            raise ValueError(f"{e.where}.label is {label!r}: only xstest sources take a label, 'safe' or 'unsafe'")
        specs.append(PromptSource(e.path, e.format, e.is_safety, e.name, e.limit, label))
    return specs


@dataclass
class Prompt:
    """A prompt as read from a source; ``ids`` are filled by the data module's tokenizer."""

    messages: list[Message]
    is_safety: bool
    source: int
    origin: str  # "<path>:<line>" for error messages and reports
    ids: list[int] = field(default_factory=list)

    @property
    def key(self) -> str:
        return json.dumps(self.messages, sort_keys=True, ensure_ascii=False)


def _user(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


def _prompts_record(record: dict[str, Any]) -> tuple[list[Message], bool | None]:
    has_prompt, has_messages = "prompt" in record, "messages" in record
    if has_prompt == has_messages:
        raise ValueError("expected exactly one of 'prompt' (a string) or 'messages' "
                         "(chat messages ending with a user turn)")
    if has_prompt:
        if not isinstance(record["prompt"], str):
            raise ValueError(f"'prompt' must be a string, got {type(record['prompt']).__name__}")
        messages = _user(record["prompt"])
    else:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list of {role, content} messages")
        if not isinstance(messages[-1], dict) or messages[-1].get("role") != "user":
            raise ValueError("'messages' must end with a user turn: the prompt the policy answers")
    is_safety = record.get("is_safety")
    if is_safety is not None and not isinstance(is_safety, bool):
        raise ValueError(f"'is_safety' must be true, false or null, got {is_safety!r}")
    return messages, is_safety


def _read_jsonl_source(spec: PromptSource, on_bad_line: Literal["error", "skip"], counts: dict[str, int]
                       ) -> Iterator[tuple[int, list[Message], bool | None]]:
    reader = read_jsonl(spec.path, on_bad_line)
    for line, record in reader:
        try:
            if spec.format == "prompts":
                messages, tag = _prompts_record(record)
                yield line, messages, tag
            elif spec.format == "hh":
                if not isinstance(record.get("chosen"), str):
                    raise ValueError("HH record needs a string 'chosen' dialog")
                first = parse_hh_dialog(record["chosen"])[0]  # always the first Human turn
                yield line, _user(first["content"]), None
            else:  # self_instruct
                seen: set[str] = set()
                for dialog in self_instruct_to_dialogs(record):
                    text = dialog[0]["content"]
                    if text not in seen:  # instances that differ only in their output
                        seen.add(text)
                        yield line, _user(text), None
        except ValueError as err:
            if on_bad_line == "error":
                raise ValueError(f"{spec.path}:{line}: {err} (format {spec.format!r})") from err
            counts["bad_lines"] += 1
    counts["bad_lines"] += reader.skipped  # lines that were not JSON objects at all


def _read_xstest(spec: PromptSource) -> Iterator[tuple[int, list[Message], bool | None]]:
    if not spec.path.is_file():
        raise FileNotFoundError(f"XSTest CSV not found: {spec.path}")
    with open(spec.path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("prompt", "label") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{spec.path}: XSTest CSV lacks column(s) {missing}; expected header "
                             f"{','.join(XSTEST_COLUMNS)}")
        for row in reader:
            line = reader.line_num
            label = (row.get("label") or "").strip()
            if label not in ("safe", "unsafe"):
                raise ValueError(f"{spec.path}:{line}: label is {label!r}; expected 'safe' or 'unsafe'")
            if spec.label is not None and label != spec.label:
                continue
            yield line, _user((row.get("prompt") or "").strip()), None


_DEFAULT_TAG: dict[str, bool] = {"prompts": False, "hh": False, "xstest": True, "self_instruct": False}


def read_prompt_source(spec: PromptSource, index: int, on_bad_line: Literal["error", "skip"] = "error"
                       ) -> tuple[list[Prompt], dict[str, int]]:
    """``(prompts, counts)`` of one source in file order; empty prompts are dropped and counted, and
    so are bad lines with ``on_bad_line="skip"``."""
    counts = {"records": 0, "empty": 0, "bad_lines": 0}
    rows = _read_xstest(spec) if spec.format == "xstest" else _read_jsonl_source(spec, on_bad_line, counts)
    default = _DEFAULT_TAG[spec.format] if spec.is_safety is None else spec.is_safety
    prompts: list[Prompt] = []
    for line, messages, tag in rows:
        counts["records"] += 1
        if not messages[-1]["content"].strip():
            counts["empty"] += 1
            continue
        prompts.append(Prompt(messages, default if tag is None else tag, index, f"{spec.path}:{line}"))
        if spec.limit is not None and len(prompts) >= spec.limit:
            break
    return prompts, counts
