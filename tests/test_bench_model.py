"""Smoke test of benchmarks/bench_model.py: `--quick` in-process. No timing assertions."""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

import pytest
from scripts import load_script

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_model.py"


def _load_bench() -> ModuleType:
    return load_script(SCRIPT)


def _positive(cell: str) -> float:
    value = float(cell)
    assert value > 0, cell
    return value


def test_quick_run_prints_table_and_passes_parity(capsys):
    bench = _load_bench()
    result = bench.main(["--quick"])
    out = capsys.readouterr().out

    assert result["logits_ok"] and result["logits_max_diff"] < bench.LOGITS_TOLERANCE
    assert "logits parity" in out and "(ok," in out
    assert result["tokens_equal"], "greedy tokens of ours and transformers differ on the tiny preset"
    assert "greedy tokens identical: True" in out
    loss_ours, loss_theirs = result["loss"]
    assert loss_ours == pytest.approx(loss_theirs, abs=1e-4)

    assert "| measurement | ours tok/s | transformers tok/s | ours/theirs |" in out
    rows = {}
    for line in out.splitlines():
        m = re.match(r"^\| (training step|greedy generation)[^|]* \| ([^|]+) \| ([^|]+) \| ([^|]+) \|$", line)
        if m:
            rows[m.group(1)] = [_positive(c.strip()) for c in m.groups()[1:]]
    assert set(rows) == {"training step", "greedy generation"}, out
    for ours, theirs, ratio in rows.values():
        assert ratio == pytest.approx(ours / theirs, rel=0.05, abs=0.01)


def test_hf_key_mapping_covers_every_parameter():
    bench = _load_bench()
    from llama2_lightning.config import LlamaConfig
    from llama2_lightning.model import Transformer

    model = Transformer(LlamaConfig.from_name("tiny"))
    mapped = bench.to_hf_state_dict(model.config, model.state_dict())
    assert len(mapped) == len(model.state_dict())
    assert "lm_head.weight" in mapped and "model.layers.1.self_attn.k_proj.weight" in mapped
