"""What the evaluations ask a model: answer a batch of dialogs (each ending with a user turn) with text.

The evaluations take any :data:`Answerer`, so their counting is tested with scripted answers and the
same code runs on a checkpoint through :func:`model_answerer`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from llama2_lightning.chat import Message, encode_prompt
from llama2_lightning.chat_template import ChatTemplate
from llama2_lightning.generation import generate
from llama2_lightning.model import Transformer
from llama2_lightning.tokenizer import Tokenizer

Answerer = Callable[[Sequence[Sequence[Message]]], list[str]]


def model_answerer(model: Transformer, tokenizer: Tokenizer, max_new_tokens: int = 128, batch_size: int = 8,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                   template: ChatTemplate | None = None) -> Answerer:
    """An :data:`Answerer` that samples ``model`` in the chat format (the Llama 2 format, or ``template``;
    greedy by default: evaluations should not depend on a sampling seed), ``batch_size`` dialogs per
    :func:`generate` call, each answer decoded up to its first EOS and stripped. A batch's answers are
    cut to the room its longest prompt leaves in the model's context; a dialog that leaves no room at all
    (a long multi-turn one) is answered with the empty string, which every check counts as a failure."""
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")

    @torch.no_grad()
    def answer(dialogs: Sequence[Sequence[Message]]) -> list[str]:
        out: list[str] = []
        limit = model.config.max_seq_len
        for start in range(0, len(dialogs), batch_size):
            prompts = [encode_prompt(tokenizer, d, template) for d in dialogs[start:start + batch_size]]
            fits = [i for i, p in enumerate(prompts) if len(p) < limit]
            texts = [""] * len(prompts)
            if fits:
                budget = min(max_new_tokens, limit - max(len(prompts[i]) for i in fits))
                rows = generate(model, [prompts[i] for i in fits], budget, temperature=temperature, top_p=top_p,
                                eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, seed=seed + start).as_lists()
                for i, row in zip(fits, rows):
                    texts[i] = tokenizer.decode([t for t in row if t != tokenizer.eos_id]).strip()
            out += texts
        return out

    return answer
