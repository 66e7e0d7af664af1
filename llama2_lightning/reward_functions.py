"""Reward functions for the RLHF stage (Touvron et al. 2023, section 3.2.3).

A :class:`RewardFunction` maps a batch of (prompt, answer) pairs to one sequence reward each, the
number that enters ``R = WHITEN(reward) - beta * KL`` (whitening and the KL term are the PPO
callback's, ``rlhf.rewards``). It receives every view of the batch the caller already holds, so no
implementation re-tokenises anything:

* ``prompts``: the chat messages, ending with the user turn that was answered;
* ``answers``: the decoded answers (EOS stripped), for rules written on text;
* ``prompt_ids`` / ``answer_ids``: the exact ids the policy saw and produced (the answer ends with EOS
  when the policy emitted one). ``prompt_ids + answer_ids`` is the chat-format sequence a reward
  model scores; a policy fine-tuned on ``encode_dialog`` output emits the same pieces (the space
  before EOS included), so this is the reward model's training distribution, and scoring the ids
  the policy sampled is scoring what it actually did.
* ``is_safety``: (B,) bool, the prompt's tag from the data module.

Implementations:

* :class:`TokenRuleReward`: share of answer tokens in a target set, a rule a randomly initialised
  tiny policy learns within a few dozen PPO iterations (tests, the tiny rule config);
* :class:`LengthRuleReward`: closeness of the answer length to a target (exercises EOS);
* :class:`RewardModelReward`: one learned reward model's raw score;
* :class:`Llama2DualReward`: the paper's helpfulness + safety reward models, gated at 0.15.

``RewardFunction`` is an abstract base class rather than a ``Protocol`` so LightningCLI can
instantiate any subclass from ``class_path`` in YAML. Reward models are *not* ``nn.Module``
attributes of the LightningModule: they are frozen, loaded from their own checkpoints, and would
only bloat every RLHF checkpoint; :meth:`RewardFunction.setup` loads and places them instead.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

from llama2_lightning.chat import Message, truncate_pair
from llama2_lightning.distributed import data_parallel_mesh, shard_transformer
from llama2_lightning.tensor_parallel import parallelize_scalar_model
from llama2_lightning.dtypes import DTYPES
from llama2_lightning.reward_models import load_reward_model, score_ids
from llama2_lightning.rlhf.reward_shaping import SAFETY_THRESHOLD, combine_rewards, logit
from llama2_lightning.scalar_model import ScalarModel
from llama2_lightning.tokenizer import Tokenizer

FrozenDType = Literal["float32", "bfloat16", "float16"]



class RewardFunction(ABC):
    """Sequence rewards for a batch of answers (module docstring for the arguments)."""

    def setup(self, device: torch.device, tokenizer: Tokenizer | None = None, device_mesh: Any | None = None) -> None:
        """Called once by the RLHF module before the first score, on every rank: load weights, place
        them on ``device``, resolve text targets with ``tokenizer``. The default does nothing."""

    @abstractmethod
    def __call__(self, prompts: Sequence[Sequence[Message]], answers: Sequence[str],
                 prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]],
                 is_safety: Tensor) -> Tensor:
        """The (B,) float32 sequence reward, on ``is_safety``'s device, before whitening."""

    def score(self, prompts: Sequence[Sequence[Message]], answers: Sequence[str],
              prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]],
              is_safety: Tensor) -> dict[str, Tensor]:
        """``{"reward": (B,)}`` plus any (B,) parts worth logging (each reward model's score...)."""
        return {"reward": self(prompts, answers, prompt_ids, answer_ids, is_safety)}


def _strip_eos(ids: Sequence[int], eos_id: int | None) -> list[int]:
    ids = list(ids)
    return ids[:-1] if eos_id is not None and ids and ids[-1] == eos_id else ids


# ---------------------------------------------------------------------------------------------- rules


class TokenRuleReward(RewardFunction):
    """Share of the answer's tokens (EOS excluded) that are in a target set, in [0, 1].

    A stand-in for a reward model where none is trained: it depends on every token, so PPO gets a
    dense signal through the whitened sequence reward, and a random policy starts near
    ``|targets| / vocab_size`` with a clear way up. ``targets`` are text pieces encoded with the
    data's tokenizer at ``setup`` (each piece's ids join the set, the word-start "▁" piece excluded
    when the tokenizer splits it off); ``target_ids`` are used as given. An empty answer scores 0.
    """

    def __init__(self, targets: list[str] | None = None, target_ids: list[int] | None = None,
                 eos_id: int | None = None) -> None:
        if not targets and not target_ids:
            raise ValueError("TokenRuleReward: give targets (text pieces) or target_ids (token ids)")
        self.targets = list(targets or [])
        self.target_ids = {int(i) for i in (target_ids or [])}
        self.eos_id = eos_id
        self._ready = not self.targets

    def setup(self, device: torch.device, tokenizer: Tokenizer | None = None, device_mesh: Any | None = None) -> None:
        if tokenizer is not None and self.eos_id is None:
            self.eos_id = tokenizer.eos_id
        if self._ready:
            return
        if tokenizer is None:
            raise ValueError("TokenRuleReward: text targets need the data module's tokenizer")
        # SentencePiece may split a word-initial "▁" into its own piece; rewarding that piece would
        # reward every word start, so it is left out unless it is the whole target.
        space_piece = tokenizer.sp.piece_to_id("\u2581")
        for text in self.targets:
            ids = tokenizer.encode(text)
            self.target_ids.update([i for i in ids if i != space_piece] or ids)
        self._ready = True

    def __call__(self, prompts: Sequence[Sequence[Message]], answers: Sequence[str],
                 prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]],
                 is_safety: Tensor) -> Tensor:
        if not self._ready:
            raise RuntimeError("TokenRuleReward: setup(tokenizer=...) must run before scoring text targets")
        values = []
        for ids in answer_ids:
            body = _strip_eos(ids, self.eos_id)
            values.append(sum(i in self.target_ids for i in body) / len(body) if body else 0.0)
        return torch.tensor(values, dtype=torch.float32, device=is_safety.device)  # (B,)


class LengthRuleReward(RewardFunction):
    """``-|n - target| / target`` for an answer of ``n`` tokens (EOS excluded), at most 0.

    Rewarding a length makes the policy learn when to emit EOS, which the token rule never needs.
    """

    def __init__(self, target_length: int, eos_id: int | None = None) -> None:
        if target_length < 1:
            raise ValueError(f"LengthRuleReward: target_length must be >= 1, got {target_length}")
        self.target_length = target_length
        self.eos_id = eos_id

    def setup(self, device: torch.device, tokenizer: Tokenizer | None = None, device_mesh: Any | None = None) -> None:
        if tokenizer is not None and self.eos_id is None:
            self.eos_id = tokenizer.eos_id

    def __call__(self, prompts: Sequence[Sequence[Message]], answers: Sequence[str],
                 prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]],
                 is_safety: Tensor) -> Tensor:
        n = torch.tensor([len(_strip_eos(ids, self.eos_id)) for ids in answer_ids], dtype=torch.float32)
        return (-(n - self.target_length).abs() / self.target_length).to(is_safety.device)  # (B,)


# ---------------------------------------------------------------------------------------------- learned


def quantize_linear_8bit(module: nn.Module, skip: Sequence[str] = ()) -> int:
    """Replace every ``nn.Linear`` under ``module`` (names in ``skip`` excepted) by a bitsandbytes
    LLM.int8 layer (Dettmers et al. 2022) holding int8 weights; returns how many were replaced.

    For frozen models only: the int8 weights carry no gradient. bitsandbytes >= 0.45 runs these on
    CPU as well as CUDA (checked with 0.50: the weights are quantised when the layer is moved to
    its device), so this is not skipped on CPU. The weights must be on the target device already.
    """
    import bitsandbytes as bnb

    replaced = 0
    for name, child in list(module.named_children()):
        if name in skip:
            continue
        if isinstance(child, nn.Linear):
            weight = child.weight.detach()
            q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                    has_fp16_weights=False, threshold=6.0)
            q.weight = bnb.nn.Int8Params(weight.cpu().clone(), requires_grad=False, has_fp16_weights=False)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.detach().clone(), requires_grad=False)
            setattr(module, name, q.to(weight.device))  # quantises here
            replaced += 1
        else:
            replaced += quantize_linear_8bit(child, skip=())
    return replaced


def load_frozen_reward_model(path: str | os.PathLike[str], device: torch.device, dtype: FrozenDType | None = None,
                             load_in_8bit: bool = False, device_mesh: Any | None = None) -> ScalarModel:
    """A reward model (``scoring.load_reward_model``) in eval mode with ``requires_grad`` off, in
    ``dtype`` (bf16 halves its memory; scores still come out float32), optionally int8, placed on
    ``device``, or sharded with FSDP2 over ``device_mesh``'s data-parallel ranks."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"frozen_dtype {dtype!r}; allowed: {', '.join(DTYPES)} or null")
    model, _ = load_reward_model(path, device="cpu", dtype=DTYPES[dtype] if dtype else None)
    model.requires_grad_(False)
    model.eval()
    if device_mesh is not None:
        if load_in_8bit:
            raise ValueError("load_in_8bit and FSDP sharding do not combine: int8 weights cannot be sharded")
        # FSDP2 moves one unit's full weights to the device at a time and keeps its shard, so a model
        # larger than one GPU is never whole on it (the CPU copy is memory-mapped where the dtype allows).
        parallelize_scalar_model(model, device_mesh)  # split over the TP group first, if there is one
        shard_transformer(model.trunk, device_mesh, None, None)
        fully_shard(model, mesh=data_parallel_mesh(device_mesh))
        # ScalarModel calls trunk.forward_hidden, not trunk(...): without this the trunk's unit would
        # never gather its own weights (embeddings, final norm).
        register_fsdp_forward_method(model.trunk, "forward_hidden")
        return model
    model.to(device)
    if load_in_8bit:
        # The head stays in floating point: it is one (1, C) matrix and sets the reward's scale.
        quantize_linear_8bit(model.trunk, skip=("output",))
    return model


class _LearnedRewardBase(RewardFunction):
    """Shared loading and scoring of frozen reward models on ``prompt_ids + answer_ids``."""

    def __init__(self, frozen_dtype: FrozenDType | None, load_in_8bit: bool, batch_size: int) -> None:
        if frozen_dtype is not None and frozen_dtype not in DTYPES:
            raise ValueError(f"frozen_dtype {frozen_dtype!r}; allowed: {', '.join(DTYPES)} or null")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.frozen_dtype = frozen_dtype
        self.load_in_8bit = load_in_8bit
        self.batch_size = batch_size
        self.pad_id = 0
        self.bos_id = 1

    def _load(self, path: str, device: torch.device, tokenizer: Tokenizer | None, device_mesh: Any | None
              ) -> ScalarModel:
        model = load_frozen_reward_model(path, device, self.frozen_dtype, self.load_in_8bit, device_mesh)
        if tokenizer is not None:
            if tokenizer.vocab_size > model.config.vocab_size:
                raise ValueError(f"reward model {path} has {model.config.vocab_size} embeddings but the prompts' "
                                 f"tokenizer has {tokenizer.vocab_size} pieces: they were not trained together")
            self.pad_id, self.bos_id = tokenizer.pad_id, tokenizer.bos_id
        return model

    @torch.no_grad()
    def _raw_scores(self, model: ScalarModel, prompt_ids: Sequence[Sequence[int]],
                    answer_ids: Sequence[Sequence[int]], device: torch.device) -> Tensor:
        """(B,) float32 raw scores read at each sequence's last real token (the answer's EOS)."""
        limit = model.config.max_seq_len
        sequences = []
        for p, a in zip(prompt_ids, answer_ids):
            ids = [*p, *a]
            if len(ids) > limit:
                # Oldest context first, as in reward-model training (data/preference.py).
                fitted = truncate_pair(ids, ids, limit, self.bos_id)
                ids = fitted[0] if fitted is not None else [self.bos_id, *ids[len(ids) - limit + 1:]]
            sequences.append(ids)
        return score_ids(model, sequences, self.pad_id, self.batch_size).to(device)  # (B,)


class RewardModelReward(_LearnedRewardBase):
    """One learned reward model; the reward is its raw score, ``LOGIT(sigmoid(score))``: the paper's
    formula with a single model (no gating), e.g. helpfulness-only PPO."""

    def __init__(self, checkpoint: str, frozen_dtype: FrozenDType | None = None, load_in_8bit: bool = False,
                 batch_size: int = 8) -> None:
        super().__init__(frozen_dtype, load_in_8bit, batch_size)
        self.checkpoint = checkpoint
        self.model: ScalarModel | None = None

    def setup(self, device: torch.device, tokenizer: Tokenizer | None = None, device_mesh: Any | None = None) -> None:
        if self.model is None:
            self.model = self._load(self.checkpoint, device, tokenizer, device_mesh)

    def score(self, prompts: Sequence[Sequence[Message]], answers: Sequence[str],
              prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]],
              is_safety: Tensor) -> dict[str, Tensor]:
        if self.model is None:
            raise RuntimeError("RewardModelReward: setup() has not loaded the reward model")
        raw = self._raw_scores(self.model, prompt_ids, answer_ids, is_safety.device)  # (B,)
        return {"reward": raw, "rm_probability": torch.sigmoid(raw)}

    def __call__(self, prompts: Sequence[Sequence[Message]], answers: Sequence[str],
                 prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]],
                 is_safety: Tensor) -> Tensor:
        return self.score(prompts, answers, prompt_ids, answer_ids, is_safety)["reward"]


class Llama2DualReward(_LearnedRewardBase):
    """The paper's reward: helpfulness and safety reward models, gated (section 3.2.3).

    Both models score every answer; with ``R_h = sigmoid(helpful)`` and ``R_s = sigmoid(safety)``,
    ``R_c = R_s if is_safety or R_s < threshold else R_h`` (``rlhf.combine_rewards``) and the returned
    reward is ``LOGIT(R_c)``. That is everything in ``R = WHITEN(LOGIT(R_c)) - beta * KL`` that depends
    on the answer alone; the PPO callback whitens over the rollout and adds the per-token KL, so
    ``whiten_rewards(reward)`` equals ``rlhf.llama2_reward(R_h, R_s, is_safety)`` on the same batch.
    ``score`` also returns ``helpful`` (R_h), ``safety`` (R_s) and ``safety_gate`` (1 where R_s was used)
    for logging.

    Args:
        helpful_checkpoint / safety_checkpoint: RewardModule checkpoints or exported HF classifiers.
        threshold: the gate on R_s (paper: 0.15, precision 0.89 / recall 0.55 on unsafe responses).
        frozen_dtype: ``bfloat16`` halves the two models' memory (scores stay float32).
        load_in_8bit: int8 trunks (bitsandbytes LLM.int8), a quarter of fp32; runs on CPU too.
        batch_size: sequences per reward-model forward.
    """

    def __init__(self, helpful_checkpoint: str, safety_checkpoint: str, threshold: float = SAFETY_THRESHOLD,
                 frozen_dtype: FrozenDType | None = None, load_in_8bit: bool = False, batch_size: int = 8) -> None:
        super().__init__(frozen_dtype, load_in_8bit, batch_size)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold is a probability of the safety model, in (0, 1); got {threshold}")
        self.helpful_checkpoint = helpful_checkpoint
        self.safety_checkpoint = safety_checkpoint
        self.threshold = threshold
        self.helpful: ScalarModel | None = None
        self.safety: ScalarModel | None = None

    def setup(self, device: torch.device, tokenizer: Tokenizer | None = None, device_mesh: Any | None = None) -> None:
        if self.helpful is None:
            self.helpful = self._load(self.helpful_checkpoint, device, tokenizer, device_mesh)
        if self.safety is None:
            self.safety = self._load(self.safety_checkpoint, device, tokenizer, device_mesh)

    def score(self, prompts: Sequence[Sequence[Message]], answers: Sequence[str],
              prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]],
              is_safety: Tensor) -> dict[str, Tensor]:
        if self.helpful is None or self.safety is None:
            raise RuntimeError("Llama2DualReward: setup() has not loaded the reward models")
        device = is_safety.device
        r_h = torch.sigmoid(self._raw_scores(self.helpful, prompt_ids, answer_ids, device))  # (B,)
        r_s = torch.sigmoid(self._raw_scores(self.safety, prompt_ids, answer_ids, device))  # (B,)
        r_c = combine_rewards(r_h, r_s, is_safety.bool(), self.threshold)  # (B,)
        gate = is_safety.bool() | (r_s < self.threshold)
        return {"reward": logit(r_c), "helpful": r_h, "safety": r_s, "safety_gate": gate.float()}

    def __call__(self, prompts: Sequence[Sequence[Message]], answers: Sequence[str],
                 prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]],
                 is_safety: Tensor) -> Tensor:
        return self.score(prompts, answers, prompt_ids, answer_ids, is_safety)["reward"]


__all__ = ["RewardFunction", "TokenRuleReward", "LengthRuleReward", "RewardModelReward", "Llama2DualReward",
           "load_frozen_reward_model", "quantize_linear_8bit"]
