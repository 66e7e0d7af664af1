"""What the evaluations ask a model: answer a batch of dialogs (each ending with a user turn) with text.

The evaluations take any :data:`Answerer`, so their counting is tested with scripted answers and the
same code runs on a checkpoint through :func:`model_answerer`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from llama2_lightning.chat import Message, encode_prompt
from llama2_lightning.generation import generate
from llama2_lightning.model import Transformer
from llama2_lightning.tokenizer import Tokenizer

Answerer = Callable[[Sequence[Sequence[Message]]], list[str]]


def model_answerer(model: Transformer, tokenizer: Tokenizer, max_new_tokens: int = 128, batch_size: int = 8,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> Answerer:
    """An :data:`Answerer` that samples ``model`` in the chat format (greedy by default: evaluations should
    not depend on a sampling seed), ``batch_size`` dialogs per :func:`generate` call, each answer decoded
    up to its first EOS and stripped."""
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")

    @torch.no_grad()
    def answer(dialogs: Sequence[Sequence[Message]]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(dialogs), batch_size):
            prompts = [encode_prompt(tokenizer, d) for d in dialogs[start:start + batch_size]]
            rows = generate(model, prompts, max_new_tokens, temperature=temperature, top_p=top_p,
                            eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, seed=seed + start).as_lists()
            out += [tokenizer.decode([t for t in row if t != tokenizer.eos_id]).strip() for row in rows]
        return out

    return answer
