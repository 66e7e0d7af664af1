"""``llama2-lightning distill``: safety context distillation data (paper section 4.2.4).

The model answers adversarial first turns with a safety preprompt as the system turn; the written
dialog drops the preprompt, so SFT on it teaches the model to answer the bare prompt the way it answers
with the preprompt in view. The paper targets the distillation to adversarial prompts only, because the
same preprompt on ordinary prompts makes answers vaguer and more often refused (for SmolLM2-135M, 0.07 ->
0.24 of ordinary HH prompts refused: ``benchmarks/results/safety-preprompt-2026-12-02.md``). So the input
here is red-team data, e.g. the first turns of the shipped ``hh_harmless`` pairs.

Output, one JSON object per line (the ``messages`` format of
:class:`~llama2_lightning.data.sft.SFTDataModule`)::

    {"messages": [{"role": "user", ...}, {"role": "assistant", ...}],
     "distilled_from": PREPROMPT, "origin": "input.jsonl.gz:LINE",
     "safety_rm_score": 0.81, "plain_safety_rm_score": 0.74}      # the scores only with --safety-rm

``--keep safety-rm`` is the paper's filter: the model also answers each prompt plainly (no preprompt), the
safety RM (``--safety-rm``) scores both answers on the bare prompt, and the distilled answer is kept only
where it scores higher; each record then carries both scores. ``--keep refusals`` keeps only answers that
the refusal rule (``evaluation/refusal.py``) counts as refusals: that couples the training data to the rule
XSTest is scored by. The default, ``--keep all``, keeps every non-empty answer. ``--skip-heldout`` works as
in ``gatt``: with ``--format hh`` it keeps the input's held-out prompts (at that fraction and seed) out.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llama2_lightning.chat import Message, encode_prompt
from llama2_lightning.chat_template import ChatTemplate
from llama2_lightning.commands.arg_types import positive_int
from llama2_lightning.commands.chat import add_model_arguments, load_chat_model, sample_answers
from llama2_lightning.commands.gatt import (
    add_heldout_arguments, check_heldout_arguments, heldout_user_turns, read_dialogs,
)
from llama2_lightning.evaluation.refusal import is_refusal
from llama2_lightning.evaluation.suite import RewardScorer
from llama2_lightning.jsonl import write_jsonl_atomic
from llama2_lightning.model import Transformer
from llama2_lightning.reward_models import load_reward_model
from llama2_lightning.tokenizer import Tokenizer

KEEP = ("all", "refusals", "safety-rm")  # --keep: which distilled answers become training dialogs

# A safety preprompt in the paper's style (its Table 39 lists them). It names the refusal's opening so that a
# 135M model, which rarely refuses on its own, has a form to copy.
SAFETY_PREPROMPT = ("You are a safe and responsible assistant. If a request is harmful, illegal or unethical, "
                    "refuse it: start your answer with \"I'm sorry, but I can't help with that.\"")


def distill_answers(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[str], preprompt: str | None,
                    max_new_tokens: int, temperature: float, top_p: float, seed: int, batch_size: int = 8,
                    template: ChatTemplate | None = None) -> list[str]:
    """One answer per prompt, sampled with ``preprompt`` as the system turn (None: the bare prompt, as the
    evaluation asks it), ``batch_size`` prompts per call, each call's seed drawn from ``random.Random(seed)``
    as ``gatt`` does. A prompt that leaves no room for ``max_new_tokens`` in the model's context is
    answered with the empty string."""
    system: list[Message] = [{"role": "system", "content": preprompt}] if preprompt is not None else []
    seeds = random.Random(seed)
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids = [encode_prompt(tokenizer, system + [{"role": "user", "content": p}], template) for p in chunk]
        fits = [i for i, x in enumerate(ids) if len(x) + max_new_tokens <= model.config.max_seq_len]
        texts = [""] * len(chunk)
        if fits:
            drawn = sample_answers(model, tokenizer, [ids[i] for i in fits], max_new_tokens, temperature, top_p,
                                   seed=seeds.randrange(2**31))
            for i, text in zip(fits, drawn):
                texts[i] = text
        answers += texts
    return answers


def distilled_records(origins: Sequence[str], prompts: Sequence[str], answers: Sequence[str], preprompt: str,
                      keep: str = "all", scores: Sequence[float] | None = None,
                      plain_scores: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """The SFT records of the answers ``keep`` admits, each without the preprompt it was sampled with.

    ``all``: every non-empty answer; ``refusals``: those the refusal rule counts as refusals; ``safety-rm``:
    those whose safety-RM score (``scores``) is above the plain answer's (``plain_scores``), the paper's
    filter (section 4.2.4: "only keep the context distillation output when the reward model score is
    higher")."""
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {', '.join(map(repr, KEEP))}, got {keep!r}")
    if keep == "safety-rm" and (scores is None or plain_scores is None):
        raise ValueError("keep='safety-rm' needs the safety RM's scores of the distilled and the plain answers")
    pairs: list[tuple[float, float]] | None = None  # (distilled, plain) score per answer
    if scores is not None and plain_scores is not None:
        if not len(scores) == len(plain_scores) == len(answers):
            raise ValueError(f"{len(answers)} answers but {len(scores)} scores and {len(plain_scores)} plain scores")
        pairs = list(zip(scores, plain_scores))
    records = []
    for k, (origin, prompt, answer) in enumerate(zip(origins, prompts, answers, strict=True)):
        if not answer.strip() or (keep == "refusals" and not is_refusal(answer)) \
                or (pairs is not None and keep == "safety-rm" and not pairs[k][0] > pairs[k][1]):
            continue
        messages: list[Message] = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        record: dict[str, Any] = {"messages": messages, "distilled_from": preprompt, "origin": origin}
        if pairs is not None:
            record.update(safety_rm_score=pairs[k][0], plain_safety_rm_score=pairs[k][1])
        records.append(record)
    return records


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama2-lightning distill",
        description="Safety context distillation (paper section 4.2.4): answer adversarial prompts with a safety "
                    "preprompt, write the dialogs without it for SFT.")
    parser.add_argument("--input", required=True, type=Path,
                        help='adversarial prompts: HH records (--format hh) or {"messages"} JSONL; the first user turn of each is '
                             'answered (an input system turn is not used: the preprompt takes its place)')
    parser.add_argument("--format", choices=("messages", "hh"), default="hh", help="the input's format")
    parser.add_argument("--output", required=True, type=Path, help="JSONL to write (see llama2_lightning/commands/distill.py)")
    parser.add_argument("--limit", type=positive_int, default=None, help="use the first N prompts")
    parser.add_argument("--preprompt", default=SAFETY_PREPROMPT, help="the system turn answers are sampled with")
    parser.add_argument("--keep", choices=KEEP, default="all",
                        help="all: every non-empty answer (default); refusals: only answers the refusal rule "
                             "counts; safety-rm: only answers the --safety-rm scores above the model's plain "
                             "answer (the paper's)")
    parser.add_argument("--safety-rm", default=None, help="safety reward-model checkpoint (with --keep safety-rm)")
    add_heldout_arguments(parser)
    parser.add_argument("--batch-size", type=positive_int, default=8, help="prompts answered together")
    add_model_arguments(parser)
    return parser


def cli_distill(argv: list[str] | None = None) -> int:
    """``llama2-lightning distill``: returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if not args.preprompt.strip():
            raise ValueError("--preprompt is empty")
        check_heldout_arguments(args)
        if (args.keep == "safety-rm") != (args.safety_rm is not None):
            raise ValueError("--keep safety-rm and --safety-rm go together "
                             "(the RM scores distilled against plain answers)")
        if not args.input.is_file():
            raise FileNotFoundError(f"--input {args.input}: no such file")
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    model, tokenizer, template = load_chat_model(parser, args)
    scorer = None
    if args.safety_rm is not None:
        try:
            rm, _ = load_reward_model(args.safety_rm, device=model.output.weight.device)
        except (FileNotFoundError, ValueError) as err:
            parser.error(f"--safety-rm {args.safety_rm}: {err}")
        scorer = RewardScorer(rm, tokenizer, template, args.batch_size)
    try:
        inputs = read_dialogs(args.input, args.limit, args.format, exclude=heldout_user_turns(args, tokenizer))
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    origins = [origin for origin, _, _ in inputs]
    prompts = [users[0] for _, _, users in inputs]  # single-turn: the adversarial opening
    answers = distill_answers(model, tokenizer, prompts, args.preprompt, args.max_new_tokens, args.temperature,
                              args.top_p, args.seed, args.batch_size, template)
    scores = plain_scores = None
    if scorer is not None:
        # The plain answers use their own seed stream, so the distilled ones are those of a run without the filter.
        plain = distill_answers(model, tokenizer, prompts, None, args.max_new_tokens, args.temperature, args.top_p,
                                args.seed + 1, args.batch_size, template)
        bare = [[{"role": "user", "content": p}] for p in prompts]  # scored as trained on: without the preprompt
        scores, plain_scores = scorer(bare, answers), scorer(bare, plain)
    records = distilled_records(origins, prompts, answers, args.preprompt, args.keep, scores, plain_scores)
    if not records:  # an empty file would let a pipeline go on into an SFT without this data
        print(f"llama2-lightning distill: error: no answer to keep from {len(prompts)} prompts of {args.input} "
              f"(--keep {args.keep}); nothing written", file=sys.stderr)
        return 1
    write_jsonl_atomic(args.output, records)
    refused = sum(is_refusal(a) for a in answers if a.strip())
    kept_refused = sum(is_refusal(r["messages"][-1]["content"]) for r in records)
    print(f"wrote {len(records)} distilled dialogs to {args.output} ({len(prompts)} prompts; by evaluation/refusal.py "
          f"{refused} distilled answers are refusals, {kept_refused} of the kept ones; "
          f"{sum(not a.strip() for a in answers)} empty or too long, dropped)")
    return 0
