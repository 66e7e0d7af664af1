"""Batched sampling with the KV cache.

Prompts of different lengths share one batch by left padding: every row's prompt ends in the same
cache slot, so one decode step serves all rows. RoPE positions are per row (a row's first real token
is position 0) and padded slots are masked out, so a row generates exactly what it would alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from llama2_lightning.model import Transformer


@dataclass
class GenerationOutput:
    tokens: Tensor
    """(B, N) sampled tokens; ``pad_id`` after a row's EOS."""
    logprobs: Tensor
    """(B, N) log-probability of each sampled token under the model (temperature 1, no top-k/top-p
    filtering), which is what PPO's ratio needs; 0 after a row ends."""
    lengths: Tensor
    """(B,) new tokens per row, its EOS included."""

    def as_lists(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths.tolist())]


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """Draw one token per row from ``logits`` (B, V); greedy when ``temperature == 0``. Returns (B,)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    if top_p < 1.0:
        # Nucleus sampling (Holtzman et al. 2020): keep the smallest set of tokens whose mass reaches top_p.
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # the first token is never dropped
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float = 1.0, eos_id: int | None = None, pad_id: int = 0,
             seed: int | None = None) -> GenerationOutput:
    """Sample up to ``max_new_tokens`` after each prompt; a row stops at its first ``eos_id``.

    The model's KV cache is allocated for the call and released afterwards."""
    from llama2_lightning.distributed import is_sharded

    # FSDP2's all-gathered parameters cannot be used under inference_mode; no_grad is enough there.
    with torch.inference_mode(not is_sharded(model)), torch.no_grad():
        return _generate(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, pad_id, seed)


def _generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
              top_k: int | None, top_p: float, eos_id: int | None, pad_id: int, seed: int | None) -> GenerationOutput:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and every prompt needs at least one token")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    device = model.output.weight.device
    B, lengths = len(prompts), torch.tensor([len(p) for p in prompts], device=device)
    P = int(lengths.max())
    total = P + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(
            f"longest prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={model.config.max_seq_len}"
        )
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    # (B, P) left-padded with id 0: padded slots are masked, so any valid id will do (pad_id may be -1)
    tokens = torch.zeros((B, P), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = torch.as_tensor(list(p), dtype=torch.long, device=device)
    slots = torch.arange(total, device=device)
    pad = (P - lengths)[:, None]  # (B, 1) left padding per row
    valid = slots[None, :] >= pad  # (B, total): pad slots are never attended
    positions = (slots[None, :] - pad).clamp(min=0)  # (B, total) per-row RoPE positions
    # Causal over slots, keys restricted to real tokens; a pad query sees itself so no row of the
    # mask is empty (an all-masked row would make SDPA return NaN).
    causal = slots[:P, None] >= slots[None, :P]  # (P, P)
    eye = torch.eye(P, dtype=torch.bool, device=device)
    prefill_mask = ((causal & valid[:, None, :P]) | eye)[:, None]  # (B, 1, P, P)

    was_training = model.training
    model.eval()
    model.setup_kv_cache(B, total)
    out_tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_logprobs = torch.zeros((B, max_new_tokens), device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    out_lengths = torch.zeros(B, dtype=torch.long, device=device)
    try:
        logits = model(tokens, input_pos=slots[:P], positions=positions[:, :P], mask=prefill_mask,
                       last_only=True)[:, -1]  # (B, V)
        for t in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, nxt[:, None]).squeeze(-1)  # (B,)
            out_tokens[:, t] = torch.where(finished, pad_id, nxt)
            out_logprobs[:, t] = torch.where(finished, 0.0, logp)
            out_lengths += (~finished).long()
            if eos_id is not None:
                finished |= nxt == eos_id
                if bool(finished.all()):
                    break
            if t + 1 == max_new_tokens:
                break
            slot = P + t
            step_mask = valid[:, None, None, : slot + 1]  # (B, 1, 1, slot + 1)
            # finished rows keep decoding their (ignored) samples: pad_id need not be a valid token id
            logits = model(
                nxt[:, None], input_pos=slots[slot : slot + 1],
                positions=positions[:, slot : slot + 1], mask=step_mask,
            )[:, -1]
    finally:
        model.reset_kv_cache()
        model.train(was_training)
    n = int(out_lengths.max()) if B else 0
    return GenerationOutput(out_tokens[:, :n], out_logprobs[:, :n], out_lengths)
