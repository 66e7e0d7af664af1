"""``llama2-lightning chat``: a multi-turn conversation with a checkpoint on stdin/stdout.

Also the model loading and answer sampling that ``llama2-lightning gatt`` shares with it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from llama2_lightning.chat import Message, encode_prompt
from llama2_lightning.chat_template import LLAMA2_FORMAT, MODEL_TEMPLATE, ChatTemplate, resolve_chat_template
from llama2_lightning.checkpoint import load_model
from llama2_lightning.commands.arg_types import positive_int, probability_mass, temperature
from llama2_lightning.dtypes import DTYPES
from llama2_lightning.generation import generate
from llama2_lightning.model import Transformer
from llama2_lightning.tokenizer import Tokenizer, find_tokenizer


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="Lightning .ckpt, a Hugging Face or Meta directory, or a .gguf file")
    parser.add_argument("--tokenizer", help="tokenizer.model, tokenizer.json or a directory holding one (default: "
                                            "the one beside or inside --checkpoint, or the .gguf's own vocabulary)")
    parser.add_argument("--chat-template", default=LLAMA2_FORMAT,
                        help=f"{LLAMA2_FORMAT!r}: the Llama 2-Chat format (default); {MODEL_TEMPLATE!r}: the "
                             "tokenizer's own template (ChatML for SmolLM2); or a Jinja template file")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast the weights (default: keep the checkpoint's dtype)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=256, help="longest answer, in tokens")
    parser.add_argument("--temperature", type=temperature, default=0.6, help="0 samples greedily")
    parser.add_argument("--top-p", type=probability_mass, default=0.9, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=0)


def load_chat_model(parser: argparse.ArgumentParser,
                    args: argparse.Namespace) -> tuple[Transformer, Tokenizer, ChatTemplate | None]:
    """The checkpoint's model (in eval mode), its tokenizer and the chat template ``--chat-template``
    names (``None``: the Llama 2 format); argument problems exit through ``parser``."""
    tok_path: Path | None = Path(args.tokenizer) if args.tokenizer else find_tokenizer(args.checkpoint)
    if tok_path is None:
        parser.error(f"no tokenizer.model or tokenizer.json beside --checkpoint {args.checkpoint}: "
                     "pass --tokenizer PATH")
    try:
        tokenizer = Tokenizer(tok_path)
        template = resolve_chat_template(args.chat_template, tokenizer)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = load_model(args.checkpoint, device=device, dtype=DTYPES[args.dtype] if args.dtype else None)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    if model.config.vocab_size < tokenizer.vocab_size:
        parser.error(f"model vocab_size {model.config.vocab_size} < {tok_path}'s {tokenizer.vocab_size} pieces: "
                     "pass the tokenizer the model was trained with")
    return model.eval(), tokenizer, template


def sample_answers(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   temperature: float, top_p: float, seed: int, num_samples: int = 1,
                   allowed_tokens: Tensor | None = None) -> list[str]:
    """``num_samples`` answers per prompt (ids ending in ``[/INST]``; prompt 0's first), each its text up to
    the first EOS, stripped the way the chat format strips an answer. ``allowed_tokens``: as
    :func:`~llama2_lightning.generation.generate`'s."""
    out = generate(model, prompts, max_new_tokens, temperature=temperature, top_p=top_p,
                   eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, seed=seed, num_samples=num_samples,
                   allowed_tokens=allowed_tokens)
    return [tokenizer.decode([t for t in row if t != tokenizer.eos_id]).strip() for row in out.as_lists()]


def cli_chat(argv: list[str] | None = None) -> int:
    """``llama2-lightning chat``: a multi-turn conversation on stdin/stdout; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="llama2-lightning chat",
        description="Chat with a checkpoint in the Llama 2-Chat format (or the model's own, --chat-template). "
                    "One user turn per line; /reset forgets the conversation, /exit (or end of input) quits.",
    )
    parser.add_argument("--system", default=None, help="system prompt (Llama 2: folded into the first turn)")
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    model, tokenizer, template = load_chat_model(parser, args)
    system: list[Message] = [{"role": "system", "content": args.system}] if args.system else []
    history: list[Message] = []
    if sys.stdin is None or sys.stdin.closed:
        print("llama2-lightning chat: error: standard input is closed: nothing to read the conversation from "
              "(pipe the user turns in, one per line, or run it in a terminal)", file=sys.stderr)
        return 1
    interactive = sys.stdin.isatty()
    turn = 0
    while True:
        if interactive:
            print(">>> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            continue
        user: Message = {"role": "user", "content": text}
        ids = encode_prompt(tokenizer, system + history + [user], template)
        alone = ids if not history else None
        if len(ids) + args.max_new_tokens > model.config.max_seq_len and history:
            alone = encode_prompt(tokenizer, system + [user], template)
        if alone is not None and len(alone) >= model.config.max_seq_len:
            # Refused before the history is touched: the conversation so far stays for the next message.
            print(f"(that message is {len(alone)} tokens with the chat markup; the model's context is "
                  f"{model.config.max_seq_len}: write a shorter one)", file=sys.stderr)
            continue
        # Forget the oldest exchange until the prompt leaves room for a full answer (the system prompt stays).
        while history and len(ids) + args.max_new_tokens > model.config.max_seq_len:
            history = history[2:]
            print("(context full: forgot the oldest exchange)", file=sys.stderr)
            ids = encode_prompt(tokenizer, system + history + [user], template)
        budget = min(args.max_new_tokens, model.config.max_seq_len - len(ids))  # >= 1: the message alone fits
        [answer] = sample_answers(model, tokenizer, [ids], budget, args.temperature, args.top_p, seed=args.seed + turn)
        print(answer, flush=True)
        history += [user, {"role": "assistant", "content": answer}]
        turn += 1
    return 0
