"""One model through every check that does not trust the reward models it was optimised on, as one JSON-able
dict: XSTest refusals (with the safety reward model's view beside the string match), helpfulness on held-out
prompts (the helpfulness reward model's score and the answer length, kept per prompt so a later report can
compute win rates against another model on the same prompts), and GAtt adherence by turn on checkable
system instructions. ``llama2-lightning evaluate`` is the command; the pipeline runs it per model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llama2_lightning.chat import Message, encode_side
from llama2_lightning.chat_template import ChatTemplate
from llama2_lightning.evaluation.answering import Answerer
from llama2_lightning.evaluation.gatt_adherence import multi_turn_answers
from llama2_lightning.evaluation.instructions import adherence_by_turn, instruction, late_turn_adherence
from llama2_lightning.evaluation.safety import evaluate_xstest
from llama2_lightning.reward_models import score_ids
from llama2_lightning.rlhf.reward_shaping import SAFETY_THRESHOLD
from llama2_lightning.scalar_model import ScalarModel
from llama2_lightning.tokenizer import Tokenizer


@dataclass
class RewardScorer:
    """A frozen reward model reading (prompt, answer) in the policy's chat format; returns sigmoid scores,
    the probability the paper's gate is defined on. A sequence longer than the model's context keeps its
    last ``max_seq_len`` tokens (the score is read at the answer's end)."""

    model: ScalarModel
    tokenizer: Tokenizer
    template: ChatTemplate | None = None
    batch_size: int = 8

    def __call__(self, prompts: Sequence[Sequence[Message]], answers: Sequence[str]) -> list[float]:
        limit = self.model.config.max_seq_len
        ids = [encode_side(self.tokenizer, p, a, self.template)[-limit:] for p, a in zip(prompts, answers, strict=True)]
        return torch.sigmoid(score_ids(self.model, ids, self.tokenizer.pad_id, self.batch_size)).tolist()


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class EvaluationSettings:
    """What to evaluate; a section whose input is ``None`` (or 0 prompts) is left out of the result."""

    xstest: str | os.PathLike[str] | None = None
    xstest_limit: int | None = None  # per label; None: all 200 unsafe and 250 safe
    xstest_seed: int = 0
    helpful_prompts: list[list[Message]] = field(default_factory=list)  # held-out prompts, each ending in a user turn
    gatt_turns: list[list[str]] = field(default_factory=list)  # user turns of each GAtt dialog
    gatt_instructions: tuple[str, ...] = ("capitals", "ahoy", "no_e", "short")


def evaluate_answerer(answer: Answerer, settings: EvaluationSettings, helpful: RewardScorer | None = None,
                      safety: RewardScorer | None = None, gatt_answer: Answerer | None = None) -> dict[str, Any]:
    """Every section of :class:`EvaluationSettings` for one model's ``answer`` (``gatt_answer``: the one
    used for the multi-turn dialogs, e.g. with shorter answers; default ``answer``)."""
    out: dict[str, Any] = {}
    if settings.xstest is not None:
        xs = evaluate_xstest(settings.xstest, answer, settings.xstest_limit, seed=settings.xstest_seed)
        section: dict[str, Any] = {"unsafe_compliance": xs.unsafe_compliance, "over_refusal": xs.over_refusal,
                                   "n_unsafe": xs.n_unsafe, "n_safe": xs.n_safe, "answers": {}}
        for label, rows in xs.answers.items():
            scores = (safety([[{"role": "user", "content": p}] for p, _, _ in rows], [a for _, a, _ in rows])
                      if safety is not None else [None] * len(rows))
            section["answers"][label] = [{"prompt": p, "answer": a, "refused": r, "safety": s}
                                         for (p, a, r), s in zip(rows, scores)]
        if safety is not None:
            unsafe = [row["safety"] for row in section["answers"]["unsafe"]]
            section["safety_rm"] = {
                "unsafe_mean": _mean(unsafe), "safe_mean": _mean([row["safety"] for row in section["answers"]["safe"]]),
                # the share of answers to unsafe prompts the safety RM calls unsafe (below the paper's gate)
                "unsafe_below_gate": sum(s < SAFETY_THRESHOLD for s in unsafe) / len(unsafe),
                "threshold": SAFETY_THRESHOLD}
        out["xstest"] = section
    if settings.helpful_prompts:
        prompts = settings.helpful_prompts
        answers = answer(prompts)
        h = helpful(prompts, answers) if helpful is not None else [None] * len(answers)
        s = safety(prompts, answers) if safety is not None else [None] * len(answers)
        rows = [{"prompt": p[-1]["content"], "answer": a, "helpful": hv, "safety": sv, "length": len(a)}
                for p, a, hv, sv in zip(prompts, answers, h, s)]
        out["helpfulness"] = {"n": len(rows), "length_mean": _mean([float(r["length"]) for r in rows]),
                              "helpful_mean": _mean([r["helpful"] for r in rows]) if helpful is not None else None,
                              "safety_mean": _mean([r["safety"] for r in rows]) if safety is not None else None,
                              "answers": rows}
    if settings.gatt_turns:
        by_instruction: dict[str, Any] = {}
        for name in settings.gatt_instructions:
            dialogs = multi_turn_answers(gatt_answer or answer, instruction(name).text, settings.gatt_turns)
            by_instruction[name] = {"by_turn": [list(t) for t in adherence_by_turn(name, dialogs)],
                                    "example": dialogs[0] if dialogs else []}
        turns = max((len(v["by_turn"]) for v in by_instruction.values()), default=0)
        mean_by_turn = [_mean([v["by_turn"][t][0] for v in by_instruction.values() if len(v["by_turn"]) > t])
                        for t in range(turns)]
        out["gatt"] = {"instructions": list(settings.gatt_instructions), "dialogs": len(settings.gatt_turns),
                       "by_instruction": by_instruction, "mean_by_turn": mean_by_turn}
    return out


def headline(result: dict[str, Any]) -> str:
    """One line for the pipeline's progress output."""
    parts = []
    if "xstest" in result:
        x = result["xstest"]
        parts.append(f"unsafe-compliance={x['unsafe_compliance']:.2f} over-refusal={x['over_refusal']:.2f}")
    if result.get("helpfulness", {}).get("helpful_mean") is not None:
        h = result["helpfulness"]
        parts.append(f"R_h={h['helpful_mean']:.3f} length={h['length_mean']:.0f}")
    late = late_turn_adherence(result["gatt"]["mean_by_turn"]) if "gatt" in result else None
    if late is not None:
        parts.append(f"GAtt turns 3+={late:.2f}")
    return " ".join(parts)
