"""generate(batch_size=...): a generation micro-batch bounds the KV cache and changes no sample (issue 15)."""

from __future__ import annotations

import torch

from llama2_lightning.generation import generate
from llama2_lightning.model import Transformer


def test_micro_batches_give_the_samples_of_one_batch(monkeypatch) -> None:
    torch.manual_seed(0)
    model = Transformer.from_name("tiny").eval()
    prompts = [[1, 5, 9, 2], [7, 7], [3, 4, 5], [8], [9, 9, 9, 9, 9]]
    whole = generate(model, prompts, 8, temperature=0.0, num_samples=2)
    first = whole.tokens[0, 2].item()  # an EOS that ends some rows early, so chunks differ in length
    whole = generate(model, prompts, 8, temperature=0.0, num_samples=2, eos_id=first, output_logits=True)
    sizes: list[int] = []
    original = model.setup_kv_cache
    monkeypatch.setattr(model, "setup_kv_cache", lambda b, *a, **k: (sizes.append(b), original(b, *a, **k))[1])
    parts = generate(model, prompts, 8, temperature=0.0, num_samples=2, eos_id=first, output_logits=True,
                     batch_size=2)
    assert sizes == [2, 2, 1]  # prompts per cache: the cache holds 2 prompts (x K=2 rows) at most
    assert parts.as_lists() == whole.as_lists()
    torch.testing.assert_close(parts.tokens, whole.tokens)
    torch.testing.assert_close(parts.logprobs, whole.logprobs)
    torch.testing.assert_close(parts.logits, whole.logits)
    torch.testing.assert_close(parts.lengths, whole.lengths)
