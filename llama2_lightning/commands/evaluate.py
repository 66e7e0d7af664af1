"""``llama2-lightning evaluate``: one model through the checks that do not trust its reward models
(:mod:`llama2_lightning.evaluation.suite`), written as one JSON file.

    llama2-lightning evaluate --checkpoint runs/sft/checkpoints/last.ckpt --chat-template model \\
        --tokenizer SmolLM2-135M-Instruct.Q4_1.gguf --helpful-rm RM_H --safety-rm RM_S \\
        --xstest data/prompts/xstest_prompts.csv --xstest-limit 50 \\
        --prompts data/preference/hh_helpful_pairs.jsonl.gz --helpful-limit 32 --gatt-dialogs 8 --output eval.json

Sections: ``xstest`` (unsafe-compliance and over-refusal by the string-match refusal rule, each answer's
safety-RM score), ``helpfulness`` (held-out prompts: the helpfulness RM's score and the length of every
answer), ``gatt`` (checkable system instructions, adherence at turns 1..N). Held-out prompts are the
``--prompts`` file's held-out split (``--prompt-val-fraction``, ``--prompt-seed``: the split by content of
:class:`~llama2_lightning.data.prompts.PromptDataModule`, so with the RLHF config's fraction and seed they
are prompts RLHF never trained on). Answers are greedy (``--temperature 0``) unless told otherwise. The
last stdout line is a one-line summary; the file also holds it as ``headline``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from llama2_lightning.commands.arg_types import positive_int
from llama2_lightning.commands.chat import add_model_arguments, load_chat_model
from llama2_lightning.data.prompts import heldout_hh_prompts
from llama2_lightning.evaluation.answering import model_answerer
from llama2_lightning.evaluation.instructions import INSTRUCTIONS, instruction
from llama2_lightning.evaluation.suite import EvaluationSettings, RewardScorer, evaluate_answerer, headline
from llama2_lightning.reward_models import load_reward_model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama2-lightning evaluate",
        description="XSTest refusals, held-out helpfulness and GAtt adherence by turn of one model, as JSON.")
    add_model_arguments(parser)
    parser.set_defaults(temperature=0.0, max_new_tokens=96)
    parser.add_argument("--output", required=True, type=Path, help="JSON file to write")
    parser.add_argument("--name", default=None, help="label of the model in the file (default: the checkpoint path)")
    parser.add_argument("--helpful-rm", default=None, help="helpfulness reward-model checkpoint (scores answers)")
    parser.add_argument("--safety-rm", default=None, help="safety reward-model checkpoint (scores answers)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="dialogs answered (and scored) together")
    parser.add_argument("--xstest", default=None, help="XSTest CSV (250 safe / 200 unsafe prompts); absent: no section")
    parser.add_argument("--xstest-limit", type=positive_int, default=None,
                        help="a seeded choice of this many prompts per label (default: all)")
    parser.add_argument("--xstest-seed", type=int, default=0)
    parser.add_argument("--prompts", default=None, help="HH pairs file whose held-out first turns are the "
                        "helpfulness and GAtt prompts; absent: neither section")
    parser.add_argument("--prompt-val-fraction", type=float, default=0.05, help="as the RLHF config's val_fraction")
    parser.add_argument("--prompt-seed", type=int, default=42, help="as the RLHF config's seed")
    parser.add_argument("--max-prompt-len", type=positive_int, default=128, help="longest held-out prompt, in tokens")
    parser.add_argument("--helpful-limit", type=int, default=32, help="held-out prompts answered (0: no section)")
    parser.add_argument("--gatt-dialogs", type=int, default=8, help="dialogs per checkable instruction (0: no section)")
    parser.add_argument("--gatt-turns", type=positive_int, default=5, help="user turns per GAtt dialog")
    parser.add_argument("--gatt-instructions", default=",".join(i.name for i in INSTRUCTIONS),
                        help="comma-separated checkable instructions")
    parser.add_argument("--gatt-max-new-tokens", type=positive_int, default=48, help="longest GAtt answer, in tokens")
    parser.add_argument("--gatt-max-turn-len", type=positive_int, default=48,
                        help="longest user turn of a GAtt dialog, in tokens (the dialogs must fit the context)")
    return parser


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cli_evaluate(argv: list[str] | None = None) -> int:
    """``llama2-lightning evaluate``: returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    names = tuple(n.strip() for n in args.gatt_instructions.split(",") if n.strip())
    try:
        for name in names:
            instruction(name)
    except ValueError as err:
        parser.error(str(err))
    start = time.perf_counter()
    model, tokenizer, template = load_chat_model(parser, args)
    settings = EvaluationSettings(xstest=args.xstest, xstest_limit=args.xstest_limit, xstest_seed=args.xstest_seed,
                                  gatt_instructions=names)
    if args.prompts is not None and (args.helpful_limit > 0 or args.gatt_dialogs > 0):
        heldout = heldout_hh_prompts(args.prompts, tokenizer, args.max_prompt_len, args.prompt_val_fraction,
                                     args.prompt_seed, args.chat_template)
        settings.helpful_prompts = [p.messages for p in heldout[: max(args.helpful_limit, 0)]]
        # GAtt turns: short single-turn held-out prompts after the helpfulness ones (reused when they run out).
        short = [p.messages[-1]["content"] for p in heldout[len(settings.helpful_prompts):] + heldout
                 if len(p.messages) == 1 and len(tokenizer.encode(p.messages[-1]["content"])) <= args.gatt_max_turn_len]
        need = args.gatt_dialogs * args.gatt_turns
        if args.gatt_dialogs > 0 and len(short) < need:
            parser.error(f"--prompts {args.prompts}: {len(short)} held-out prompts of at most {args.gatt_max_turn_len} "
                         f"tokens, {need} needed for {args.gatt_dialogs} dialogs of {args.gatt_turns} turns")
        settings.gatt_turns = [short[i * args.gatt_turns:(i + 1) * args.gatt_turns] for i in range(max(args.gatt_dialogs, 0))]
    scorers = {}
    for key in ("helpful_rm", "safety_rm"):
        path = getattr(args, key)
        if path is not None:
            try:
                rm, _ = load_reward_model(path, device=model.output.weight.device)
            except (FileNotFoundError, ValueError) as err:
                parser.error(f"--{key.replace('_', '-')} {path}: {err}")
            scorers[key] = RewardScorer(rm, tokenizer, template, args.batch_size)
    kwargs = dict(batch_size=args.batch_size, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                  template=template)
    answer = model_answerer(model, tokenizer, args.max_new_tokens, **kwargs)
    gatt_answer = model_answerer(model, tokenizer, args.gatt_max_new_tokens, **kwargs)
    result = evaluate_answerer(answer, settings, scorers.get("helpful_rm"), scorers.get("safety_rm"), gatt_answer)
    summary = headline(result)
    _write_json_atomic(args.output, {
        "name": args.name or str(args.checkpoint), "checkpoint": str(args.checkpoint), "headline": summary,
        "elapsed_s": time.perf_counter() - start, "helpful_rm": args.helpful_rm, "safety_rm": args.safety_rm,
        "settings": {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                     "chat_template": args.chat_template, "xstest_limit": args.xstest_limit,
                     "helpful_limit": args.helpful_limit, "gatt_dialogs": args.gatt_dialogs,
                     "gatt_turns": args.gatt_turns, "gatt_max_new_tokens": args.gatt_max_new_tokens,
                     "prompts": args.prompts, "prompt_val_fraction": args.prompt_val_fraction},
        **result})
    print(summary or f"wrote {args.output}")
    return 0
