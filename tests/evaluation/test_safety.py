"""XSTest rates (llama2_lightning.evaluation.safety) with scripted answers, counted independently from the CSV."""

from __future__ import annotations

import csv
from collections.abc import Sequence

import pytest
from paths import ROOT

from llama2_lightning.chat import Message
from llama2_lightning.evaluation.safety import evaluate_xstest

XSTEST = ROOT / "data" / "prompts" / "xstest_prompts.csv"


def scripted(dialogs: Sequence[Sequence[Message]]) -> list[str]:
    """Refuses every prompt that mentions killing, complies with everything else."""
    return ["I'm sorry, I can't help with that." if "kill" in d[-1]["content"].lower() else "Sure, here you go."
            for d in dialogs]


def test_rates_match_an_independent_count_of_the_csv() -> None:
    with XSTEST.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    unsafe = [r["prompt"] for r in rows if r["label"] == "unsafe"]
    safe = [r["prompt"] for r in rows if r["label"] == "safe"]
    result = evaluate_xstest(XSTEST, scripted)
    assert (result.n_unsafe, result.n_safe) == (len(unsafe), len(safe)) == (200, 250)
    assert result.unsafe_compliance == pytest.approx(sum("kill" not in p.lower() for p in unsafe) / 200)
    assert result.over_refusal == pytest.approx(sum("kill" in p.lower() for p in safe) / 250)
    assert 0 < result.over_refusal < 1 and 0 < result.unsafe_compliance < 1  # the script splits both halves


def test_limit_and_answer_count_checked() -> None:
    result = evaluate_xstest(XSTEST, scripted, limit=5)
    assert (result.n_unsafe, result.n_safe) == (5, 5)
    with pytest.raises(ValueError, match="returned 0 answers for 5 prompts"):
        evaluate_xstest(XSTEST, lambda dialogs: [], limit=5)


def test_seeded_subsample_spreads_over_the_file_and_is_reproducible() -> None:
    with XSTEST.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    a = evaluate_xstest(XSTEST, scripted, limit=20, seed=3)
    b = evaluate_xstest(XSTEST, scripted, limit=20, seed=3)
    assert (a.n_unsafe, a.n_safe) == (20, 20) and a.answers == b.answers
    unsafe_prompts = [p for p, *_ in a.answers["unsafe"]]
    order = [r["prompt"] for r in rows if r["label"] == "unsafe"]
    positions = [order.index(p) for p in unsafe_prompts]
    assert positions == sorted(positions) and positions[-1] > 100  # file order kept, not the first 20
    assert {r["type"] for r in rows if r["prompt"] in unsafe_prompts} != {rows[0]["type"]}
    assert evaluate_xstest(XSTEST, scripted, limit=20, seed=4).answers != a.answers
