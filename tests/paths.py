"""Where the tests find the project's shipped files, whatever folder a test file sits in."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "tokenizer.model"  # the shipped 2,048-piece SentencePiece model
SELF_INSTRUCT = ROOT / "data" / "sft" / "self_instruct_seed_tasks.jsonl"
SHAKESPEARE = ROOT / "data" / "tinyshakespeare.txt"
