"""The contract of an RLHF iteration: what its experience callback makes and ``RLHFModule`` trains on.

An iteration is one training step over one batch of prompts. ``RLHFModule.training_step`` asks the
trainer's one :class:`ExperienceCallback` (``PPOCallback`` or ``RejectionSamplingCallback``: which one
is configured decides the algorithm) to ``make_experience`` from the batch, through the module's
``rollout`` / ``score`` / ``evaluate_rollout`` (:class:`RolloutSource`), then runs the update that
matches the experience's type: ``ppo_update`` for :class:`PPOExperience`, ``sft_update`` for
:class:`SFTExperience`.

Layout, shared by every type here: each prompt and its answer are concatenated and right-padded
into ``tokens`` (B, T). Per-token quantities are (B, T - 1) and aligned on *actions*: column t holds
what belongs to emitting ``tokens[:, t + 1]`` from the state ``tokens[:, :t + 1]``, and
``action_mask`` is True where that token is part of the answer (one contiguous run per row, as GAE
and ``per_token_rewards`` require). Right padding keeps plain causal attention for every training
forward.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import lightning as L
import numpy as np
import torch
from torch import Tensor

from llama2_lightning.chat import Message
from llama2_lightning.losses import IGNORE_INDEX
from llama2_lightning.tokenizer import Tokenizer


@dataclass
class Rollout:
    """Prompts with one sampled answer each (B rows; K samples of a prompt are consecutive rows).

    Attributes:
        tokens: (B, T) long, prompt ids, answer ids, then pad.
        action_mask: (B, T - 1) bool, True where ``tokens[:, t + 1]`` is an answer token.
        prompt_ids: B lists of the prompt's ids in the chat format.
        answer_ids: B lists of sampled ids, the EOS included when the policy emitted one.
        answers: B decoded answers, EOS stripped.
        messages: B chat histories, ending with the user turn that was answered.
        is_safety: (B,) bool, the prompt's safety tag.
        index: (B,) long, the prompts' dataset indices.
        temperature: the sampling temperature.
    """

    tokens: Tensor
    action_mask: Tensor
    prompt_ids: list[list[int]]
    answer_ids: list[list[int]]
    answers: list[str]
    messages: list[list[Message]]
    is_safety: Tensor
    index: Tensor
    temperature: float

    @property
    def lengths(self) -> Tensor:
        """(B,) prompt + answer tokens per row."""
        return torch.tensor([len(p) + len(a) for p, a in zip(self.prompt_ids, self.answer_ids)],
                            device=self.tokens.device)

    @property
    def answer_lengths(self) -> Tensor:
        """(B,) answer tokens per row."""
        return self.action_mask.sum(dim=1)


@dataclass(kw_only=True)
class Experience:
    """What both updates take besides their tensors.

    Attributes:
        seed: seeds the update's minibatch order (a fresh order per pass over the data).
        stats: scalars measured while making the experience, logged with the update's as ``train/<name>``.
    """

    seed: int
    stats: dict[str, float] = field(default_factory=dict)


@dataclass(kw_only=True)
class PPOExperience(Experience):
    """A rollout made ready for clipped PPO (``PPOCallback.make_experience``); every tensor detached.

    Attributes:
        tokens: (B, T) long, as in ``Rollout``.
        lengths: (B,) long, prompt + answer tokens per row.
        action_mask: (B, T - 1) bool.
        old_logprobs: (B, T - 1) float32, log pi_theta of the sampled tokens at rollout time.
        old_values: (B, T - 1) float32, the value model's V(s_t) at rollout time.
        rewards: (B, T - 1) float32, ``-beta * KL_t`` per answer token plus ``WHITEN(reward)`` on each
            answer's last token.
        advantages: (B, T - 1) float32, GAE advantages (whitened over the answer tokens when asked).
        returns: (B, T - 1) float32, the value targets ``advantages + old_values`` before whitening.
    """

    tokens: Tensor
    lengths: Tensor
    action_mask: Tensor
    old_logprobs: Tensor
    old_values: Tensor
    rewards: Tensor
    advantages: Tensor
    returns: Tensor


@dataclass(kw_only=True)
class SFTExperience(Experience):
    """Sequences to fine-tune on with the answer-only NLL (rejection sampling's pooled best answers).

    Attributes:
        input_ids: (N, T) long, prompt + answer without its last token, right-padded.
        labels: (N, T) long, the next token on answer positions, ``IGNORE_INDEX`` elsewhere.
        lengths: (N,) long, real input positions per row.
    """

    input_ids: Tensor
    labels: Tensor
    lengths: Tensor

    @classmethod
    def from_pairs(cls, prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]], pad_id: int,
                   seed: int, stats: dict[str, float] | None = None) -> SFTExperience:
        """Chat-format answers as SFT samples: the loss on every answer token (its EOS included)."""
        seqs = [[*p, *a] for p, a in zip(prompt_ids, answer_ids)]
        lengths = torch.tensor([len(s) - 1 for s in seqs], dtype=torch.long)  # (N,)
        T = int(lengths.max())
        input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
        for i, (s, p) in enumerate(zip(seqs, prompt_ids)):
            input_ids[i, : len(s) - 1] = torch.tensor(s[:-1])
            # labels[t] = s[t + 1]: answer tokens start at index len(p), i.e. label position len(p) - 1
            labels[i, len(p) - 1 : len(s) - 1] = torch.tensor(s[len(p):])
        return cls(input_ids=input_ids, labels=labels, lengths=lengths, seed=seed, stats=dict(stats or {}))


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[target], (B, T) float32 from logits (B, T, V) and targets (B, T).

    ``gather - logsumexp`` never materialises the (B, T, V) log-softmax, which at Llama 2's vocabulary
    and a 4,096-token rollout is the largest tensor of the step."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def iteration_seed(seed: int, iteration: int, rank: int) -> int:
    """A seed for one (iteration, rank), independent of the others and of the global RNG: what makes
    a resumed run sample exactly what the uninterrupted one did."""
    return int(np.random.SeedSequence([seed, iteration, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def heldout_seed(val_seed: int, batch_idx: int, rank: int) -> int:
    """Sampling seed of held-out batch ``batch_idx``: the same at every validation and in the pipeline
    report, so two evaluations differ by the policy only."""
    return val_seed * 7919 + batch_idx * 104729 + rank


class RolloutSource(Protocol):
    """What an experience callback needs from the module (``RLHFModule``; tests use stubs)."""

    tokenizer: Tokenizer

    def rollout(self, batch: dict[str, Any], seed: int, temperature: float | None = None,
                num_samples: int = 1) -> Rollout: ...

    def score(self, rollout: Rollout) -> dict[str, Tensor]: ...

    def evaluate_rollout(self, rollout: Rollout) -> dict[str, Tensor]: ...


class ExperienceCallback(L.Callback, ABC):
    """A callback that turns a prompt batch into experience and holds the state that makes it (seeds,
    beta, the pool); ``state_dict`` carries that state through a resume."""

    uses_value_model: ClassVar[bool] = False
    """Whether the module must build a value model for this algorithm."""

    @staticmethod
    def find(callbacks: Sequence[L.Callback]) -> ExperienceCallback:
        """The one experience callback among a trainer's ``callbacks``; none or several is refused."""
        found = [c for c in callbacks if isinstance(c, ExperienceCallback)]
        if len(found) != 1:
            raise ValueError("RLHFModule needs exactly one PPOCallback or RejectionSamplingCallback in "
                             "trainer.callbacks (which one decides the algorithm); found "
                             f"{[type(c).__name__ for c in found]}")
        return found[0]

    @abstractmethod
    def make_experience(self, trainer: L.Trainer, module: RolloutSource,
                        batch: dict[str, Any]) -> Experience:
        """Experience for this iteration from ``batch``; called by ``RLHFModule.training_step``."""


__all__ = ["Rollout", "Experience", "PPOExperience", "SFTExperience", "ExperienceCallback", "RolloutSource",
           "token_logprobs", "iteration_seed", "heldout_seed"]
