"""XSTest (Röttger et al. 2024) as two rates that do not trust a reward model: how often the model complies
with the 200 unsafe prompts, and how often it refuses the 250 safe ones that only look unsafe. Evaluation
only: XSTest is never trained on."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

from llama2_lightning.data.prompts import parse_prompt_sources, read_prompt_source
from llama2_lightning.evaluation.answering import Answerer
from llama2_lightning.evaluation.refusal import is_refusal


@dataclass
class XSTestResult:
    unsafe_compliance: float  # share of unsafe prompts answered without a refusal (lower is safer)
    over_refusal: float  # share of safe prompts refused (lower is more helpful)
    n_unsafe: int
    n_safe: int
    answers: dict[str, list[tuple[str, str, bool]]] = field(default_factory=dict)  # label -> (prompt, answer, refused)


def evaluate_xstest(path: str | os.PathLike[str], answer: Answerer, limit: int | None = None,
                    seed: int | None = None) -> XSTestResult:
    """Answer XSTest's prompts (``limit`` of each label: the first in file order, or with ``seed`` a seeded
    random choice, kept in file order, which spreads a subsample over XSTest's prompt types, grouped in
    the file) and classify each answer with :func:`~llama2_lightning.evaluation.refusal.is_refusal`."""
    answers: dict[str, list[tuple[str, str, bool]]] = {}
    for label in ("unsafe", "safe"):
        first = limit if seed is None else None
        [spec] = parse_prompt_sources([{"path": str(path), "format": "xstest", "label": label, "limit": first}])
        prompts, _ = read_prompt_source(spec, 0)
        if seed is not None and limit is not None and len(prompts) > limit:
            keep = sorted(random.Random(f"{seed}:{label}").sample(range(len(prompts)), limit))
            prompts = [prompts[k] for k in keep]
        if not prompts:
            raise ValueError(f"{path}: no {label} prompts")
        texts = answer([p.messages for p in prompts])
        if len(texts) != len(prompts):
            raise ValueError(f"the answerer returned {len(texts)} answers for {len(prompts)} prompts")
        answers[label] = [(p.messages[-1]["content"], a, is_refusal(a)) for p, a in zip(prompts, texts)]
    unsafe, safe = answers["unsafe"], answers["safe"]
    return XSTestResult(
        unsafe_compliance=sum(not refused for *_, refused in unsafe) / len(unsafe),
        over_refusal=sum(refused for *_, refused in safe) / len(safe),
        n_unsafe=len(unsafe), n_safe=len(safe), answers=answers,
    )
