"""The report's helpfulness section counts refusals of ordinary held-out requests by the string rule, beside
the helpfulness RM's score (a policy that refuses everything can keep a weak RM's score); the GAtt section
states how many answers its turns-3+ rate rests on and that rate's standard error."""

from __future__ import annotations

import math
from typing import Any

import pytest

from llama2_lightning.pipeline.evaluation_report import gatt_section, helpfulness_section, late_answers
from llama2_lightning.pipeline.report import md_table


def _helpfulness(answers: list[str]) -> dict[str, Any]:
    rows = [{"prompt": f"question {k}", "answer": a, "helpful": 0.4, "safety": 0.7, "length": len(a)}
            for k, a in enumerate(answers)]
    return {"helpfulness": {"n": len(rows), "helpful_mean": 0.4, "safety_mean": 0.7,
                            "length_mean": sum(len(a) for a in answers) / len(answers), "answers": rows}}


def test_helpfulness_section_reports_the_share_refused() -> None:
    evals = {"eval-sft": _helpfulness(["Boil water first.", "Use a tent.", "Try a map.", "Ask a ranger."]),
             "eval-final": _helpfulness(["I'm sorry, but I can't help with that.", "Use a tent.",
                                         "I cannot assist with that request.", "Ask a ranger."])}
    lines, summary = helpfulness_section(evals, {"before": "eval-sft", "after": "eval-final"}, md_table)
    table_text = next(line for line in lines if "refused (string rule)" in line)
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in table_text.splitlines()]
    assert cells[0][-1] == "refused (string rule)"
    rows = {r[0]: r for r in cells[2:]}  # below the header and its rule
    assert rows["eval-sft"][-1] == "0.000"
    assert rows["eval-final"][-1] == "0.500"
    assert summary["win_rate"] == 0.5  # equal RM scores: every prompt a tie


def _gatt(by_turn: list[list[float]]) -> dict[str, Any]:
    # two instructions, 4 dialogs each: by_turn rows are [mean, count] per turn, as evaluation/suite.py writes them
    by_instruction = {k: {"by_turn": [[m, 4] for m in by_turn[i]], "example": []}
                      for i, k in enumerate(["capitals", "ahoy"])}
    turns = len(by_turn[0])
    return {"gatt": {"instructions": list(by_instruction), "dialogs": 4, "by_instruction": by_instruction,
                     "mean_by_turn": [sum(r[t] for r in by_turn) / 2 for t in range(turns)]}}


def test_gatt_section_states_the_late_turn_sample_and_its_standard_error() -> None:
    evals = {"eval-base": _gatt([[1.0, 0.5, 0.0, 0.0, 0.0], [1.0, 0.5, 0.25, 0.0, 0.0]]),
             "eval-gatt": _gatt([[1.0, 1.0, 0.5, 0.5, 0.5], [1.0, 0.75, 0.5, 0.25, 0.25]])}
    lines, summary = gatt_section(evals, {"gatt_before": "eval-base", "gatt_after": "eval-gatt"}, md_table)
    assert late_answers(evals["eval-gatt"]["gatt"]) == 24  # 2 instructions x 4 dialogs x turns 3-5
    late = summary["eval-gatt"]["late"]
    assert late == pytest.approx(2.5 / 6)
    verdict = next(line for line in lines if line.startswith("Turns 3+"))
    assert "on 24 answers each" in verdict
    assert f"±{100 * math.sqrt(late * (1 - late) / 24):.1f} points" in verdict
