"""The report's helpfulness section counts refusals of ordinary held-out requests by the string rule, beside
the helpfulness RM's score (a policy that refuses everything can keep a weak RM's score)."""

from __future__ import annotations

from typing import Any

from llama2_lightning.pipeline.evaluation_report import helpfulness_section
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
