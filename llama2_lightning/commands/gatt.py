"""``llama2-lightning gatt``: Ghost Attention training dialogs sampled turn by turn with a checkpoint.

``llama2-lightning gatt`` builds Ghost Attention (GAtt) training dialogs (paper section 3.3). For each
input dialog (its user turns; any assistant turns in the input are ignored) it draws an instruction
(:func:`~llama2_lightning.gatt.sample_gatt_instruction`) and samples every answer with the current
model while the instruction is appended to *every* user turn: turn 1 is answered, the answer joins the
context, then turn 2, and so on, so each answer respects the instruction throughout the dialog. The
written sample keeps the instruction only at the start of the dialog (:func:`~llama2_lightning.gatt.gatt_sample`:
the system slot by default) and flags only the last answer for training.

Output, one JSON object per line::

    {"messages": [{"role": "system", "content": INSTRUCTION}, {"role": "user", ...}, {"role": "assistant", ...}, ...],
     "gatt_instruction": INSTRUCTION,
     "train_turns": [false, false, false, ..., true],   # one flag per message: GAtt trains the last answer only
     "origin": "input.jsonl:LINE"}

The ``messages`` format of :class:`~llama2_lightning.data.sft.SFTDataModule` reads these lines as they
are; ``train_turns`` is what ``encode_dialog(..., train_turns=...)`` takes to zero the loss on every
earlier turn, as the paper does.

Inputs are ``{"messages": [...]}`` lines or, with ``--format hh``, Anthropic HH records (the user turns
of their ``chosen`` dialog); ``--min-turns`` / ``--max-turns`` keep dialogs with enough user turns and
cut long ones. ``--instruction-set`` draws the paper's instructions (hobby, language, public figure),
the machine-checkable ones of :mod:`llama2_lightning.evaluation.instructions` (``--checkable`` names a
subset, so others stay unseen for evaluation), or either at random (``mixed``). ``--require-check``
drops a dialog whose last answer (the one trained on) does not follow its checkable instruction;
``--enforce`` puts a checkable instruction into the sampling itself, for a model too small to follow it
when asked (:mod:`llama2_lightning.gatt_constraints`). ``--skip-heldout`` keeps the evaluation's held-out
HH prompts (the ``evaluate`` command's) out of the training dialogs.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llama2_lightning.chat import Message, encode_prompt
from llama2_lightning.chat_template import ChatTemplate
from llama2_lightning.commands.arg_types import positive_int
from llama2_lightning.commands.chat import add_model_arguments, load_chat_model, sample_answers
from llama2_lightning.data.prompts import heldout_hh_prompts
from llama2_lightning.data.readers import parse_hh_dialog
from llama2_lightning.evaluation.instructions import INSTRUCTIONS, instruction as checkable_instruction
from llama2_lightning.gatt import append_instruction, gatt_sample, sample_gatt_instruction
from llama2_lightning.gatt_constraints import allowed_token_mask, finish_answer, token_texts
from llama2_lightning.jsonl import read_jsonl, write_jsonl_atomic
from llama2_lightning.model import Transformer
from llama2_lightning.tokenizer import Tokenizer


def read_dialogs(path: Path, limit: int | None, fmt: str = "messages", min_turns: int = 1,
                  max_turns: int | None = None, exclude: frozenset[str] = frozenset()
                  ) -> list[tuple[str, str | None, list[str]]]:
    """(origin, system prompt or None, user turns) per line of a ``{"messages": [...]}`` JSONL file (or of
    an HH file's ``chosen`` dialogs), keeping dialogs of at least ``min_turns`` user turns, cut to ``max_turns``,
    that share no user turn with ``exclude``."""
    out: list[tuple[str, str | None, list[str]]] = []
    for lineno, record in read_jsonl(path):
        origin = f"{path}:{lineno}"
        if fmt == "hh":
            try:
                messages = parse_hh_dialog(record.get("chosen"))
            except ValueError as err:
                raise ValueError(f"{origin}: {err}") from None
        else:
            messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{origin}: expected an object with a non-empty 'messages' list")
        system: str | None = None
        users: list[str] = []
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise ValueError(f"{origin}: message {k} must be {{'role': system|user|assistant, 'content': str}}")
            if m["role"] == "system":
                if k != 0:
                    raise ValueError(f"{origin}: message {k}: a system message is only allowed first")
                system = m["content"]
            elif m["role"] == "user":
                users.append(m["content"])
        if not users:
            raise ValueError(f"{origin}: the dialog has no user turn to answer")
        if len(users) < min_turns or any(not u.strip() for u in users) or exclude.intersection(users):
            continue
        out.append((origin, system, users[:max_turns]))
        if limit is not None and len(out) >= limit:
            break
    return out


def pick_answer(candidates: Sequence[str], check: Callable[[str], bool] | None) -> str:
    """The first of a turn's sampled answers that follows the dialog's checkable instruction (the first
    non-empty one without a check, or when none passes)."""
    if check is not None:
        for answer in candidates:
            if answer and check(answer):
                return answer
    return next((a for a in candidates if a), "")


def sample_gatt_dialogs(model: Transformer, tokenizer: Tokenizer, dialogs: Sequence[tuple[str | None, list[str]]],
                        instructions: Sequence[str], max_new_tokens: int, temperature: float, top_p: float,
                        seed: int, batch_size: int = 8, template: ChatTemplate | None = None,
                        checks: Sequence[Callable[[str], bool] | None] | None = None,
                        samples_per_turn: int = 1, enforced: Sequence[str | None] | None = None) -> list[list[Message]]:
    """Answer each dialog's user turns in order with ``instructions[i]`` appended to every user turn.

    With ``samples_per_turn`` K > 1, each turn draws K answers and keeps the first that passes
    ``checks[i]`` (:func:`pick_answer`): rejection sampling on the instruction's program check, so a
    small model that follows an instruction only sometimes still yields dialogs that follow it.
    ``enforced[i]`` names a checkable instruction to enforce while sampling dialog i
    (:mod:`llama2_lightning.gatt_constraints`: a token mask, upper-casing or a closing word added), or is None.

    ``dialogs[i]`` is (system prompt or None, user turns). Returns the dialogs *without* the instruction
    (system message first when given, then user/assistant pairs). A dialog ends early at the first turn
    whose prompt and answer would not fit the model's context, or whose answer comes out empty (an empty
    last answer would teach the model to say nothing); one with no turn answered comes back with no
    assistant message. Turn k of up to ``batch_size`` dialogs is sampled in one batch.
    """
    if len(dialogs) != len(instructions):
        raise ValueError(f"{len(dialogs)} dialogs but {len(instructions)} instructions")
    seeds = random.Random(seed)  # one generation seed per batch call, in a fixed call order
    enforced = list(enforced) if enforced is not None else [None] * len(dialogs)
    if len(enforced) != len(dialogs):
        raise ValueError(f"{len(dialogs)} dialogs but {len(enforced)} enforced instructions")
    masks = _enforcement_masks(model, tokenizer, enforced)  # name -> (V,) bool, for the maskable ones
    results: list[list[Message]] = [[{"role": "system", "content": s}] if s is not None else [] for s, _ in dialogs]
    for start in range(0, len(dialogs), batch_size):
        open_rows = set(range(start, min(start + batch_size, len(dialogs))))
        turn = 0
        while True:
            rows, prompts = [], []
            for i in sorted(open_rows):
                users = dialogs[i][1]
                if turn >= len(users):
                    open_rows.discard(i)
                    continue
                context = results[i] + [{"role": "user", "content": users[turn]}]
                ids = encode_prompt(tokenizer, append_instruction(context, instructions[i]), template)
                if len(ids) + max_new_tokens > model.config.max_seq_len:
                    open_rows.discard(i)
                    continue
                rows.append(i)
                prompts.append(ids)
            if not rows:
                break
            allowed = None
            if any(enforced[i] in masks for i in rows):
                everything = torch.ones(model.config.vocab_size, dtype=torch.bool)
                allowed = torch.stack([masks.get(enforced[i], everything) for i in rows])  # (rows, V)
            drawn = sample_answers(model, tokenizer, prompts, max_new_tokens, temperature, top_p,
                                   seed=seeds.randrange(2**31), num_samples=samples_per_turn, allowed_tokens=allowed)
            answers = [pick_answer([finish_answer(enforced[i], a)
                                    for a in drawn[k * samples_per_turn:(k + 1) * samples_per_turn]],
                                   checks[i] if checks is not None else None) for k, i in enumerate(rows)]
            for i, answer in zip(rows, answers):
                if not answer:
                    open_rows.discard(i)
                    continue
                results[i] += [{"role": "user", "content": dialogs[i][1][turn]},
                               {"role": "assistant", "content": answer}]
            turn += 1
    return results


def _enforcement_masks(model: Transformer, tokenizer: Tokenizer, enforced: Sequence[str | None]) -> dict[str, Tensor]:
    """The allowed-token mask of each enforced instruction a mask can enforce (decoding the vocabulary once)."""
    names = sorted({n for n in enforced if n is not None})
    if not names:
        return {}
    texts = token_texts(tokenizer)
    masks = {n: allowed_token_mask(n, texts, model.config.vocab_size, tokenizer.eos_id) for n in names}
    return {n: m for n, m in masks.items() if m is not None}


def add_heldout_arguments(parser: argparse.ArgumentParser) -> None:
    """``--skip-heldout`` and the split it names, for a command that samples training data from an HH file
    whose held-out prompts the ``evaluate`` command uses (``gatt``, ``distill``)."""
    parser.add_argument("--skip-heldout", type=float, default=None, metavar="FRACTION",
                        help="with --format hh: skip dialogs sharing a user turn with the input's held-out prompts at "
                             "this val_fraction (evaluate's --prompt-val-fraction), so they are never trained on")
    parser.add_argument("--heldout-seed", type=int, default=42, help="the held-out split's seed (evaluate's --prompt-seed)")
    parser.add_argument("--heldout-max-prompt-len", type=positive_int, default=128,
                        help="the held-out split's prompt bound in tokens (evaluate's --max-prompt-len)")


def check_heldout_arguments(args: argparse.Namespace) -> None:
    """Raises ``ValueError`` for a ``--skip-heldout`` that cannot name a split (checked before the model loads)."""
    if args.skip_heldout is not None and args.format != "hh":
        raise ValueError("--skip-heldout needs --format hh (the held-out split is the HH prompt data's)")
    if args.skip_heldout is not None and not 0 < args.skip_heldout < 1:
        raise ValueError(f"--skip-heldout is a held-out fraction in (0, 1) (evaluate's --prompt-val-fraction), "
                         f"got {args.skip_heldout}")


def heldout_user_turns(args: argparse.Namespace, tokenizer: Tokenizer) -> frozenset[str]:
    """The user turns of the held-out prompts ``--skip-heldout`` keeps out (empty without it)."""
    if args.skip_heldout is None:
        return frozenset()
    held = heldout_hh_prompts(args.input, tokenizer, args.heldout_max_prompt_len, args.skip_heldout,
                              args.heldout_seed, args.chat_template)
    return frozenset(m["content"] for p in held for m in p.messages if m["role"] == "user")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama2-lightning gatt",
        description="Sample Ghost Attention (GAtt) dialogs: answers drawn with a random instruction on every "
                    "user turn, written with the instruction only at the start (paper section 3.3).",
    )
    parser.add_argument("--input", required=True, type=Path,
                        help='JSONL of {"messages": [...]} dialogs (or HH records, --format hh); only the system and '
                             'user turns are used')
    parser.add_argument("--format", choices=("messages", "hh"), default="messages", help="the input's format")
    parser.add_argument("--output", required=True, type=Path, help="JSONL to write (see llama2_lightning/commands/gatt.py)")
    parser.add_argument("--limit", type=int, default=None, help="use the first N dialogs (after --min-turns)")
    parser.add_argument("--min-turns", type=int, default=1, help="skip dialogs with fewer user turns")
    parser.add_argument("--max-turns", type=int, default=None, help="answer at most this many user turns per dialog")
    parser.add_argument("--placement", choices=("system", "first_user"), default="system",
                        help="where the instruction stays in the written dialog (see gatt.gatt_sample)")
    parser.add_argument("--instruction-set", choices=("paper", "checkable", "mixed"), default="paper",
                        help="paper: hobby/language/figure (default); checkable: evaluation.instructions; mixed: either")
    parser.add_argument("--checkable", default=",".join(i.name for i in INSTRUCTIONS),
                        help="comma-separated checkable instructions to draw from (the rest stay unseen)")
    parser.add_argument("--samples-per-turn", type=int, default=1,
                        help="answers drawn per turn; the first that follows a checkable instruction is kept")
    parser.add_argument("--enforce", action="store_true",
                        help="enforce a checkable instruction while sampling (gatt_constraints: no_e by a token mask, "
                             "capitals by upper-casing, ahoy by adding the closing word; short by --samples-per-turn alone)")
    parser.add_argument("--require-check", action="store_true",
                        help="drop a dialog whose last answer does not follow its checkable instruction")
    add_heldout_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="dialogs answered together, turn by turn")
    add_model_arguments(parser)
    return parser


def _draw_instructions(rng: random.Random, n: int, instruction_set: str,
                       checkable: Sequence[str]) -> list[tuple[str, str | None]]:
    """(instruction text, checkable name or None) per dialog."""
    out: list[tuple[str, str | None]] = []
    for _ in range(n):
        if instruction_set == "paper" or (instruction_set == "mixed" and rng.random() < 0.5):
            out.append((sample_gatt_instruction(rng), None))
        else:
            name = rng.choice(list(checkable))
            out.append((checkable_instruction(name).text, name))
    return out


def cli_gatt(argv: list[str] | None = None) -> int:
    """``llama2-lightning gatt``: returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.samples_per_turn < 1:
        parser.error(f"--batch-size and --samples-per-turn must be >= 1, got {args.batch_size}, {args.samples_per_turn}")
    checkable = [c.strip() for c in args.checkable.split(",") if c.strip()]
    try:
        for name in checkable:
            checkable_instruction(name)
        if not checkable and args.instruction_set != "paper":
            raise ValueError("--checkable is empty")
        check_heldout_arguments(args)
        if not args.input.is_file():
            raise FileNotFoundError(f"--input {args.input}: no such file")
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    model, tokenizer, template = load_chat_model(parser, args)
    try:
        inputs = read_dialogs(args.input, args.limit, args.format, args.min_turns, args.max_turns,
                              heldout_user_turns(args, tokenizer))
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))

    rng = random.Random(args.seed)
    # Drawn before any sampling, so a dialog's instruction depends on the seed and its position only.
    drawn = _draw_instructions(rng, len(inputs), args.instruction_set, checkable)
    instructions = [text for text, _ in drawn]
    sampled = sample_gatt_dialogs(model, tokenizer, [(s, u) for _, s, u in inputs], instructions,
                                  args.max_new_tokens, args.temperature, args.top_p, args.seed, args.batch_size,
                                  template=template, samples_per_turn=args.samples_per_turn,
                                  checks=[checkable_instruction(c).check if c else None for _, c in drawn],
                                  enforced=[c for _, c in drawn] if args.enforce else None)
    records: list[dict[str, Any]] = []
    shortened = skipped = failed = 0
    for (origin, _, users), (instruction, check), dialog in zip(inputs, drawn, sampled):
        answered = sum(m["role"] == "assistant" for m in dialog)
        if answered == 0:
            skipped += 1
            continue
        if args.require_check and check is not None and not checkable_instruction(check).check(dialog[-1]["content"]):
            failed += 1
            continue
        shortened += answered < len(users)
        # gatt_sample takes the dialog as it was sampled (instruction on every user turn) and keeps the
        # instruction at the start only; it refuses a dialog that was not built that way.
        messages, flags = gatt_sample(append_instruction(dialog, instruction), instruction, args.placement)
        records.append({"messages": messages, "gatt_instruction": instruction, "train_turns": flags,
                        "origin": origin})
    write_jsonl_atomic(args.output, records)
    print(f"wrote {len(records)} GAtt dialogs to {args.output} ({shortened} shortened to fit the context or at an "
          f"empty answer, {skipped} skipped: not even the first turn could be answered, {failed} dropped: the last "
          "answer did not follow its checkable instruction)")
    return 0
