"""Preference files as raw pairs: the ``sources`` entries of a preference data module and the record
formats (``pairs``, HH-RLHF dialogs) they name."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llama2_lightning.chat import Message
from llama2_lightning.data.readers import hh_pair_to_prompt_and_answers
from llama2_lightning.data.sources import source_entries

# ---------------------------------------------------------------------------------------------- sources
from llama2_lightning.rlhf.ranking import MARGINS

# The paper's four preference ratings (section 3.2.1), the keys of the margin tables.
MARGIN_LABELS: tuple[str, ...] = tuple(MARGINS["small"])
SOURCE_FORMATS: tuple[str, ...] = ("pairs", "hh")
_SOURCE_KEYS = ("path", "format", "weight", "is_safety", "name", "limit")


@dataclass(frozen=True)
class SourceSpec:
    """One validated entry of ``sources`` / ``val_sources``."""

    path: Path
    format: Literal["pairs", "hh"] = "pairs"
    weight: float | None = None
    is_safety: bool | None = None
    name: str = ""
    limit: int | None = None  # read only the first `limit` records (tiny runs, tests)


def parse_sources(sources: Sequence[Mapping[str, Any]], key: str = "sources") -> list[SourceSpec]:
    """Validate a config's list of source dicts; errors name the entry, the key and the allowed values."""
    specs: list[SourceSpec] = []
    for e in source_entries(sources, key, _SOURCE_KEYS, SOURCE_FORMATS, "pairs"):
        weight = e.raw.get("weight")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0):
            raise ValueError(f"{e.where}.weight must be a number >= 0 or null (use the source whole), got {weight!r}")
        specs.append(SourceSpec(e.path, e.format, None if weight is None else float(weight), e.is_safety, e.name,
                                e.limit))
    return specs


@dataclass
class RawPair:
    """A pair as read from a file, before tokenisation."""

    line: int
    prompt: list[Message]
    chosen: str
    rejected: str
    margin_label: str | None = None
    is_safety: bool | None = None


def _pairs_record(record: dict[str, Any], line: int) -> RawPair:
    """One ``"pairs"`` record; ``ValueError`` says what is wrong (the caller adds file:line)."""
    has_prompt, has_messages = "prompt" in record, "messages" in record
    if has_prompt == has_messages:
        raise ValueError("expected exactly one of 'prompt' (a string) or 'messages' (a list of chat messages)")
    if has_prompt:
        if not isinstance(record["prompt"], str):
            raise ValueError(f"'prompt' must be a string, got {type(record['prompt']).__name__}")
        prompt: list[Message] = [{"role": "user", "content": record["prompt"]}]
    else:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list of {role, content} messages")
        last = messages[-1]
        if not isinstance(last, dict) or last.get("role") != "user":
            raise ValueError("'messages' must end with a user turn: the prompt that 'chosen' and 'rejected' answer")
        prompt = messages
    for side in ("chosen", "rejected"):
        if not isinstance(record.get(side), str):
            raise ValueError(f"'{side}' must be a string (the assistant's answer), got {record.get(side)!r}")
    label = record.get("margin_label")
    if label is not None and label not in MARGIN_LABELS:
        raise ValueError(f"'margin_label' is {label!r}; allowed: {', '.join(MARGIN_LABELS)} or null/missing")
    is_safety = record.get("is_safety")
    if is_safety is not None and not isinstance(is_safety, bool):
        raise ValueError(f"'is_safety' must be true, false or null, got {is_safety!r}")
    return RawPair(line, prompt, record["chosen"], record["rejected"], label, is_safety)


def _hh_record(record: dict[str, Any], line: int) -> RawPair:
    for side in ("chosen", "rejected"):
        if not isinstance(record.get(side), str):
            raise ValueError(f"HH record needs a string '{side}' dialog, got {record.get(side)!r}")
    prompt, chosen, rejected = hh_pair_to_prompt_and_answers(record["chosen"], record["rejected"])
    return RawPair(line, prompt, chosen, rejected)


_RECORD_PARSERS = {"pairs": _pairs_record, "hh": _hh_record}


def _limited(reader: Iterator[tuple[int, dict[str, Any]]], limit: int | None) -> Iterator[tuple[int, dict[str, Any]]]:
    for n, item in enumerate(reader):
        if limit is not None and n >= limit:
            return
        yield item
