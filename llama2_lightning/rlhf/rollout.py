"""Sample a rollout from a policy and score it: the first steps of every RLHF iteration.

Plain functions over a policy, a tokenizer and a reward function, so that the experience callbacks
(through ``RLHFModule``), its held-out evaluation and the pipeline report all sample and score the
same way, and the report needs no LightningModule to do it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from llama2_lightning.distributed import gathered, is_sharded
from llama2_lightning.generation import generate
from llama2_lightning.model import Transformer
from llama2_lightning.reward_functions import RewardFunction
from llama2_lightning.rlhf.experience import Rollout, token_logprobs
from llama2_lightning.rlhf.global_stats import lockstep_batches
from llama2_lightning.scalar_model import ScalarModel
from llama2_lightning.tokenizer import Tokenizer


@torch.no_grad()
def sample_rollout(policy: Transformer, tokenizer: Tokenizer, batch: dict[str, Any], seed: int, *,
                   max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None,
                   num_samples: int = 1, compile: bool = False, batch_size: int | None = None) -> Rollout:
    """``num_samples`` answers per prompt of ``batch`` (a ``PromptDataModule`` batch), each prompt's
    samples consecutive (row ``i * num_samples + k``), laid out as ``Rollout`` documents.

    ``batch_size``: sequences decoded at once (``generate``'s micro-batch, which bounds the KV cache),
    rounded down to whole prompts of ``num_samples`` rows, at least one prompt; ``None``: all at once."""
    prompts = [list(p) for p in batch["prompt_ids"]]
    prompt_ids = [p for p in prompts for _ in range(num_samples)]
    longest = max(len(p) for p in prompt_ids)
    if longest + max_new_tokens > policy.config.max_seq_len:
        raise ValueError(f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the policy's "
                         f"max_seq_len={policy.config.max_seq_len}; lower data.max_prompt_len or max_new_tokens")
    if compile and is_sharded(policy):
        raise ValueError("RLHFModule(compile_rollouts=True) needs an unsharded policy: a sharded one is "
                         "gathered into new storage for every rollout, which a compiled step cannot keep "
                         "up with; set compile_rollouts: false or train on one device")
    with gathered(policy):
        # Each prompt prefilled once, its cache copied to its num_samples rows (prefix reuse).
        out = generate(policy, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, seed=int(seed), num_samples=num_samples,
                       compile=compile, batch_size=None if batch_size is None else max(1, batch_size // num_samples))
    answer_ids = out.as_lists()
    B, device = len(prompt_ids), policy.output.weight.device
    T = max(len(p) + len(a) for p, a in zip(prompt_ids, answer_ids))
    tokens = torch.full((B, T), tokenizer.pad_id, dtype=torch.long)
    action_mask = torch.zeros((B, T - 1), dtype=torch.bool)
    for i, (p, a) in enumerate(zip(prompt_ids, answer_ids)):
        tokens[i, : len(p) + len(a)] = torch.tensor([*p, *a])
        action_mask[i, len(p) - 1 : len(p) + len(a) - 1] = True  # column t emits tokens[t + 1]
    answers = [tokenizer.decode([t for t in a if t != tokenizer.eos_id]).strip() for a in answer_ids]
    return Rollout(
        tokens=tokens.to(device), action_mask=action_mask.to(device), prompt_ids=prompt_ids,
        answer_ids=answer_ids, answers=answers, messages=[m for m in batch["messages"] for _ in range(num_samples)],
        is_safety=batch["is_safety"].to(device).bool().repeat_interleave(num_samples, dim=0),
        index=batch["index"].to(device).repeat_interleave(num_samples, dim=0), temperature=float(temperature),
    )


@torch.no_grad()
def score_rollout(reward: RewardFunction, rollout: Rollout) -> dict[str, Tensor]:
    """The reward function's ``{"reward": (B,), parts...}`` for a rollout, checked, float32 on the
    rollout's device. ``reward.setup`` must have run."""
    parts = reward.score(rollout.messages, rollout.answers, rollout.prompt_ids, rollout.answer_ids,
                         rollout.is_safety)
    r = parts.get("reward")
    B = rollout.tokens.size(0)
    if not isinstance(r, Tensor) or r.shape != (B,):
        raise ValueError(f"{type(reward).__name__}.score must return {{'reward': tensor of shape ({B},)}}, "
                         f"got {None if r is None else tuple(getattr(r, 'shape', ()))}")
    if not bool(torch.isfinite(r).all()):
        raise ValueError(f"{type(reward).__name__} returned non-finite rewards: {r.tolist()}")
    return {k: v.float().to(rollout.tokens.device) for k, v in parts.items()}


def chunks(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of ``range(n)``, ``size`` long (the last one shorter)."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@torch.no_grad()
def logprobs_of(model: Transformer, tokens: Tensor, lengths: Tensor, chunk_size: int, group: Any = None) -> Tensor:
    """(B, T - 1) float32 log-probs of ``tokens[:, 1:]`` (B, T) under ``model``, ``chunk_size`` rows at a
    time, each chunk trimmed to its longest real sequence (``lengths`` (B,)); 0 beyond a row's end.

    ``group``: the data-parallel group of a sharded ``model``. Every forward of a sharded model is a
    collective, so every rank runs as many chunks as the rank with the most rows (the extra ones
    recompute a chunk and are discarded); ``None`` with torch.distributed initialised: the default group."""
    B, T = tokens.shape
    out = torch.zeros((B, T - 1), device=tokens.device)
    for [sl], weight in lockstep_batches(list(chunks(B, chunk_size)), 1, group, tokens.device):
        Tm = int(lengths[sl].max())
        x = tokens[sl, :Tm]
        lp = token_logprobs(model(x[:, :-1]), x[:, 1:])
        if weight:
            out[sl, : Tm - 1] = lp
    return out


@torch.no_grad()
def values_of(value_model: ScalarModel, tokens: Tensor, lengths: Tensor, chunk_size: int, group: Any = None) -> Tensor:
    """(B, T - 1) float32 value V(s_t) of each action position's state, chunked (and kept in step over
    ``group``) as ``logprobs_of``."""
    B, T = tokens.shape
    out = torch.zeros((B, T - 1), device=tokens.device)
    for [sl], weight in lockstep_batches(list(chunks(B, chunk_size)), 1, group, tokens.device):
        Tm = int(lengths[sl].max())
        v = value_model.forward_all(tokens[sl, : Tm - 1])
        if weight:
            out[sl, : Tm - 1] = v
    return out


__all__ = ["sample_rollout", "score_rollout", "logprobs_of", "values_of", "chunks"]
