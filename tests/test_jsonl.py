"""``llama2_lightning.jsonl``: the one JSONL reader (plain and gzip), bad lines and errors."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from llama2_lightning.jsonl import read_jsonl


@pytest.mark.parametrize("gz", [False, True])
def test_read_jsonl_bad_lines(tmp_path: Path, gz: bool) -> None:
    lines = ['{"a": 1}', "", '{"a": 2', "[1, 2]", '{"a": 3}']
    data = ("\n".join(lines) + "\n").encode()
    path = tmp_path / ("d.jsonl.gz" if gz else "d.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:3: malformed JSON"):
        list(read_jsonl(path))
    reader = read_jsonl(path, on_bad_line="skip")
    assert list(reader) == [(1, {"a": 1}), (5, {"a": 3})]
    assert reader.skipped == 2 and reader.skipped_lines == [3, 4]


def test_read_jsonl_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"a": 1}) + "\n" + "[]\n")
    with pytest.raises(ValueError, match=r"x\.jsonl:2: expected a JSON object"):
        list(read_jsonl(path))
    with pytest.raises(ValueError, match="on_bad_line"):
        read_jsonl(path, on_bad_line="warn")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_jsonl(tmp_path / "missing.jsonl")
