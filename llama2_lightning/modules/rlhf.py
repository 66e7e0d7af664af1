"""RLHF: PPO and rejection-sampling fine-tuning of the chat policy (Touvron et al. 2023, section 3.2.3).

Division of labour
    One training epoch is one RLHF iteration and sees exactly one batch of prompts
    (``PromptDataModule``). An experience callback turns that batch into *experience* in
    ``on_train_batch_start`` and hands it to this module, whose ``training_step`` then optimises on it
    in minibatches with manual optimisation (several optimiser steps per training step):

    * :class:`~llama2_lightning.callbacks.ppo.PPOCallback`: rollouts, reward - beta * KL per token, GAE,
      whitening; the module takes clipped PPO steps on policy and value model;
    * :class:`~llama2_lightning.callbacks.rejection_sampling.RejectionSamplingCallback`: K samples per
      prompt, the best kept and pooled over rounds; the module fine-tunes on the pool (answer-only NLL).

    The callbacks own what makes experience and its state (beta, the rollout seed stream, the pool);
    the module owns the models, the losses, the optimiser and the metrics. Generation, scoring and
    the log-prob/value passes are module methods (:meth:`rollout`, :meth:`score`,
    :meth:`evaluate_rollout`) so the held-out evaluation in ``validation_step`` measures the policy
    exactly as the callbacks sample it.

Why one batch per epoch
    A checkpoint is then always written between iterations, where the only state is the weights,
    the optimiser and the callbacks' ``state_dict``; the prompts of iteration i are a pure function
    of i (``IterationSampler``) and so are the sampling and minibatch seeds, so a run killed after a
    checkpoint and resumed with ``--ckpt_path`` continues exactly (tested). A rollout is never
    stored in a checkpoint, and ``max_epochs`` is the paper's iteration count (200-400).

Layout of a rollout
    Each prompt and its answer are concatenated and right-padded into ``tokens`` (B, T). Log-probs,
    values, rewards and advantages are all (B, T - 1) and aligned on *actions*: column t holds the
    quantities for emitting ``tokens[:, t + 1]`` from the state ``tokens[:, :t + 1]``, and
    ``action_mask`` is True where that token is part of the answer (one contiguous run per row, as
    GAE and ``per_token_rewards`` require). Right padding keeps plain causal attention (SDPA's fused
    kernel) for every training forward.

Models
    ``model``: the policy (trainable, from ``init_from``, the SFT checkpoint); ``ref_model``: the frozen
    initial policy pi_0 of the KL term (same weights, eval, no grad, optionally bf16); ``value_model``
    (PPO only): ``ScalarModel`` trunk + head, from ``value_init_from`` (a reward-model checkpoint keeps
    its head, any language-model checkpoint gets a new head) or by default from the policy's own
    initial weights; ``reward``: any :class:`~llama2_lightning.reward_functions.RewardFunction`, outside the
    state dict. The checkpoint's ``model.*`` weights and ``llama_config`` are the policy's, so an RLHF
    checkpoint is a valid ``init_from`` for the next round, ``chat`` or ``convert``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import MeanMetric

from llama2_lightning.chat import Message
from llama2_lightning.checkpoint import read_config
from llama2_lightning.config import LlamaConfig
from llama2_lightning.distributed import data_parallel_mesh, gathered, is_sharded, shard_transformer
from llama2_lightning.tensor_parallel import parallelize_scalar_model, parallelize_transformer
from llama2_lightning.dtypes import resolve_dtype
from llama2_lightning.generation import generate
from llama2_lightning.losses import IGNORE_INDEX, answer_loss
from llama2_lightning.model import Transformer
from llama2_lightning.modules.common import build_config, load_initial_weights
from llama2_lightning.optim import OptimizerName, build_optimizer, param_groups
from llama2_lightning.reward_functions import FrozenDType, RewardFunction
from llama2_lightning.reward_models import is_reward_checkpoint, load_reward_weights
from llama2_lightning.rlhf.kl import kl_penalty
from llama2_lightning.rlhf.ppo import entropy_from_logits, ppo_policy_loss, ppo_value_loss
from llama2_lightning.scalar_model import ScalarModel
from llama2_lightning.tokenizer import Tokenizer

Algorithm = Literal["ppo", "rejection_sampling"]


# ---------------------------------------------------------------------------------------------- data


@dataclass
class Rollout:
    """Prompts with one sampled answer each, as right-padded sequences (module docstring, "Layout")."""

    tokens: Tensor  # (B, T) long: prompt ids, answer ids, pad
    action_mask: Tensor  # (B, T - 1) bool: True where tokens[:, t + 1] is an answer token
    prompt_ids: list[list[int]]
    answer_ids: list[list[int]]  # as sampled, the EOS included when the policy emitted one
    answers: list[str]  # decoded, EOS stripped
    messages: list[list[Message]]
    is_safety: Tensor  # (B,) bool
    index: Tensor  # (B,) long, the prompts' dataset indices
    temperature: float

    @property
    def lengths(self) -> Tensor:
        """(B,) prompt + answer tokens per row."""
        return torch.tensor([len(p) + len(a) for p, a in zip(self.prompt_ids, self.answer_ids)],
                            device=self.tokens.device)

    @property
    def answer_lengths(self) -> Tensor:
        return self.action_mask.sum(dim=1)  # (B,)


@dataclass
class PPOExperience:
    """A rollout made ready for PPO by :class:`~llama2_lightning.callbacks.ppo.PPOCallback`; every
    per-token tensor is (B, T - 1) on action positions, detached."""

    tokens: Tensor  # (B, T)
    lengths: Tensor  # (B,) prompt + answer tokens per row
    action_mask: Tensor
    old_logprobs: Tensor  # log pi_theta at rollout time
    old_values: Tensor
    rewards: Tensor  # per-token rewards: -beta * KL_t, plus WHITEN(reward) on each answer's last token
    advantages: Tensor  # whitened GAE advantages
    returns: Tensor  # GAE value targets
    batch_index: Tensor  # (B,) the prompt batch it was made from
    seed: int  # minibatch shuffling
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class SFTExperience:
    """Sequences to fine-tune on with the answer-only NLL (rejection sampling's pooled best answers)."""

    input_ids: Tensor  # (N, T) prompt + answer, right-padded, without the last token
    labels: Tensor  # (N, T) the next token on answer positions, IGNORE_INDEX elsewhere
    lengths: Tensor  # (N,) real input positions per row
    batch_index: Tensor  # (B,) the prompt batch it was made from
    seed: int
    stats: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_pairs(cls, prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]], pad_id: int,
                   batch_index: Tensor, seed: int, stats: dict[str, float] | None = None) -> SFTExperience:
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
        return cls(input_ids, labels, lengths, batch_index, seed, dict(stats or {}))


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[target], (B, T) float32 from logits (B, T, V) and targets (B, T).

    ``gather - logsumexp`` never materialises the (B, T, V) log-softmax, which at Llama 2's vocabulary
    and a 4,096-token rollout is the largest tensor of the step."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


# ---------------------------------------------------------------------------------------------- module


class RLHFModule(L.LightningModule):
    """Policy, frozen reference, value model and reward for Llama 2's RLHF stage (module docstring).

    Args:
        init_from: the SFT checkpoint (any format): the policy and the reference pi_0.
        model / model_overrides: preset or config dict (``None``: the config stored with ``init_from``).
        reward: the sequence reward, a ``RewardFunction`` (``class_path`` in YAML).
        algorithm: ``"ppo"`` (needs ``PPOCallback``) or ``"rejection_sampling"`` (needs
            ``RejectionSamplingCallback``; no value model is built).
        value_init_from: PPO value model: a reward checkpoint (trunk and head) or a language-model
            checkpoint (new head); ``None`` starts from ``init_from`` with a new head.
        frozen_dtype: dtype of the reference model (``bfloat16`` halves it; its log-probs are then
            slightly off the policy's, so the KL starts a little above 0).
        max_new_tokens / temperature / top_p / top_k: how the policy answers, in rollouts and on
            held-out prompts. PPO's ratio needs samples from the policy itself: keep temperature 1,
            top_p 1 and no top_k for PPO (rejection sampling has its own temperature schedule).
        compile_rollouts: sample rollouts and held-out answers with ``generate(compile=True)``: on CUDA
            the decode step replays as one CUDA graph (6-10x eager decoding for a 1B model on an H200,
            ``benchmarks/README.md``) and follows the policy's updates in place. On CPU the compiled step
            freezes the weights, so it is rebuilt after every update and pays only where many tokens
            come from fixed weights. Needs an unsharded policy.
        lr: policy learning rate, constant (paper, PPO: 1e-6). value_lr: the value model's (default lr).
        betas / eps / weight_decay: AdamW (paper: 0.9/0.95, 1e-5, 0.1).
        optimizer: ``"adamw"`` or ``"adamw8bit"`` (bitsandbytes: about 4x less optimiser-state memory).
        grad_clip: gradient-norm clip, applied to policy and value model separately (paper: 1.0).
        minibatch_size: sequences per optimiser step (paper: 64, one step per minibatch).
        micro_batch_size: sequences per forward/backward inside a minibatch (gradient accumulation for
            memory; the step is the same); ``None``: the whole minibatch.
        ppo_epochs: passes over each rollout (paper: 1, implied by 512 prompts in minibatches of 64 with
            one gradient step each).
        sft_epochs: passes over the rejection-sampling pool per round.
        clip_eps: PPO ratio clip (paper: 0.2). value_clip_eps: value clip, in reward units.
        val_seed: sampling seed of the held-out evaluation, the same at every validation so that
            successive evaluations differ by the policy only.
        log_samples: held-out (prompt, answer, reward) rows logged per validation (wandb Table).
        param_dtype / reduce_dtype / activation_checkpointing: as in ``PretrainModule`` (FSDP2 mixed
            precision when sharded; recompute blocks in backward).
    """

    def __init__(
        self,
        init_from: str | None = None,
        model: str | dict[str, Any] | None = None,
        model_overrides: dict[str, Any] | None = None,
        reward: RewardFunction | None = None,
        algorithm: Algorithm = "ppo",
        value_init_from: str | None = None,
        frozen_dtype: FrozenDType | None = None,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        compile_rollouts: bool = False,
        lr: float = 1e-6,
        value_lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-5,
        weight_decay: float = 0.1,
        optimizer: OptimizerName = "adamw",
        grad_clip: float | None = 1.0,
        minibatch_size: int = 64,
        micro_batch_size: int | None = None,
        ppo_epochs: int = 1,
        sft_epochs: int = 1,
        clip_eps: float = 0.2,
        value_clip_eps: float = 0.2,
        val_seed: int = 1234,
        log_samples: int = 4,
        activation_checkpointing: bool = False,
        param_dtype: str | None = None,
        reduce_dtype: str | None = "float32",
    ) -> None:
        super().__init__()
        if algorithm not in ("ppo", "rejection_sampling"):
            raise ValueError(f"algorithm {algorithm!r}; allowed: ppo, rejection_sampling")
        if reward is None:
            raise ValueError("reward: give a RewardFunction, e.g. "
                             "class_path: llama2_lightning.reward_functions.Llama2DualReward")
        if model is None and init_from is None:
            raise ValueError("RLHFModule: set init_from (the SFT checkpoint) or model (a preset, random weights)")
        if frozen_dtype is not None and frozen_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"frozen_dtype {frozen_dtype!r}; allowed: float32, bfloat16, float16 or null")
        for name, value in (("max_new_tokens", max_new_tokens), ("minibatch_size", minibatch_size),
                            ("ppo_epochs", ppo_epochs), ("sft_epochs", sft_epochs)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or null, got {micro_batch_size}")
        # The reward object stays out of hparams: checkpoints are loaded with weights_only=True and
        # must hold plain data only (the CLI's config.yaml still records it).
        self.save_hyperparameters(ignore=["reward"])
        self.automatic_optimization = False  # several PPO / SFT steps per training step
        try:
            self.config: LlamaConfig = build_config(model, model_overrides, init_from)
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"RLHFModule: init_from={init_from!r} not found ({err}); train the SFT model first (e.g. "
                "`llama2-lightning fit --config configs/sft/tiny.yaml`) or pass --model.init_args.init_from PATH"
            ) from None
        self.reward = reward
        self.model: Transformer | None = None
        self.ref_model: Transformer | None = None
        self.value_model: ScalarModel | None = None
        self.experience: PPOExperience | SFTExperience | None = None
        self._tokenizer: Tokenizer | None = None
        self._reward_ready = False
        # Held-out means over every prompt of a validation (reduced over ranks by torchmetrics).
        self.val_reward, self.val_kl, self.val_kl_k3, self.val_length = (MeanMetric() for _ in range(4))
        self._val_parts: dict[str, list[float]] = {}
        self._val_rows: list[list[Any]] = []
        self._sample_table: list[list[Any]] = []

    # ------------------------------------------------------------------------------------- models
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            dm = self.trainer.datamodule if self._trainer is not None else None
            tok = getattr(dm, "tokenizer", None)
            if tok is None:
                raise RuntimeError("RLHFModule needs a tokenizer: use PromptDataModule, or set module.tokenizer")
            self._tokenizer = tok
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        vocab = getattr(dm, "vocab_size", None)
        if vocab is not None and vocab > self.config.vocab_size:
            raise ValueError(f"the tokenizer has {vocab} pieces but the policy's vocab_size is "
                             f"{self.config.vocab_size}: use the tokenizer the SFT model was trained with "
                             "(--data.init_args.tokenizer_path)")
        longest = getattr(dm, "max_prompt_len", None)
        if longest is not None and longest + self.hparams.max_new_tokens > self.config.max_seq_len:
            raise ValueError(
                f"data max_prompt_len={longest} + max_new_tokens={self.hparams.max_new_tokens} exceeds the policy's "
                f"max_seq_len={self.config.max_seq_len}: lower --data.init_args.max_prompt_len or "
                "--model.init_args.max_new_tokens")

    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        # Under ModelParallelStrategy this runs on the meta device; loading assigns the checkpoint's
        # tensors, and the strategy materialises whatever is left with reset_parameters.
        policy = Transformer(self.config)
        policy.activation_checkpointing = hp.activation_checkpointing
        ref = Transformer(self.config)
        if hp.init_from:
            load_initial_weights(policy, hp.init_from)
            load_initial_weights(ref, hp.init_from)
        else:
            ref.load_state_dict(policy.state_dict())  # pi_0 is the initial policy, whatever its weights
        ref.requires_grad_(False)
        ref.eval()
        if hp.frozen_dtype is not None:
            ref.to(resolve_dtype(hp.frozen_dtype))
        value = self._build_value_model() if hp.algorithm == "ppo" else None
        if self.device_mesh is not None:
            # TP first (a no-op at tensor_parallel_size 1): rollouts then decode with each rank's heads
            parallelize_transformer(policy, self.device_mesh)
            parallelize_transformer(ref, self.device_mesh)
            shard_transformer(policy, self.device_mesh, hp.param_dtype, hp.reduce_dtype)
            shard_transformer(ref, self.device_mesh, None, None)
            if value is not None:
                from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

                parallelize_scalar_model(value, self.device_mesh)
                shard_transformer(value.trunk, self.device_mesh, hp.param_dtype, hp.reduce_dtype)
                # The root unit owns the head, so its gradient is reduced across ranks too.
                fully_shard(value, mesh=data_parallel_mesh(self.device_mesh), mp_policy=MixedPrecisionPolicy(
                    param_dtype=resolve_dtype(hp.param_dtype), reduce_dtype=resolve_dtype(hp.reduce_dtype)))
                # PPO calls value.forward_all, which calls trunk.forward_hidden: FSDP2 hooks only
                # forward(), so both units must gather on these methods too.
                register_fsdp_forward_method(value, "forward_all")
                register_fsdp_forward_method(value.trunk, "forward_hidden")
        self.model, self.ref_model, self.value_model = policy, ref, value

    def _build_value_model(self) -> ScalarModel:
        hp = self.hparams
        source = hp.value_init_from or hp.init_from
        config = self.config
        if hp.value_init_from:
            config = read_config(hp.value_init_from)
        trunk = Transformer(config)
        trunk.activation_checkpointing = hp.activation_checkpointing
        reward_init = bool(source) and is_reward_checkpoint(source)
        if source and not reward_init:
            load_initial_weights(trunk, source)
        value = ScalarModel.from_transformer(trunk, drop_lm_head=True)
        if reward_init:
            load_reward_weights(value, source)
        return value

    def train(self, mode: bool = True) -> RLHFModule:
        super().train(mode)
        if self.ref_model is not None:
            self.ref_model.eval()  # Lightning puts the whole module in train mode; pi_0 stays frozen
        return self

    def set_experience(self, experience: PPOExperience | SFTExperience) -> None:
        """Called by the experience callback, consumed by the next ``training_step``."""
        self.experience = experience

    # --------------------------------------------------------------------------- rollouts & scores
    @torch.no_grad()
    def rollout(self, batch: dict[str, Any], seed: int, temperature: float | None = None,
                num_samples: int = 1) -> Rollout:
        """Sample ``num_samples`` answers per prompt of ``batch`` (a PromptDataModule batch), each
        prompt's samples consecutive (row ``i * num_samples + k``), from the current policy."""
        assert self.model is not None, "configure_model() has not run"
        hp = self.hparams
        tok = self.tokenizer
        temperature = hp.temperature if temperature is None else temperature
        prompts = [list(p) for p in batch["prompt_ids"]]
        prompt_ids = [p for p in prompts for _ in range(num_samples)]
        longest = max(len(p) for p in prompt_ids)
        if longest + hp.max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"a prompt of {longest} tokens + max_new_tokens={hp.max_new_tokens} exceeds the policy's "
                             f"max_seq_len={self.config.max_seq_len}; lower data.max_prompt_len or max_new_tokens")
        if hp.compile_rollouts and is_sharded(self.model):
            raise ValueError("RLHFModule(compile_rollouts=True) needs an unsharded policy: a sharded one is "
                             "gathered into new storage for every rollout, which a compiled step cannot keep "
                             "up with; set compile_rollouts: false or train on one device")
        with gathered(self.model):
            # Each prompt prefilled once, its cache copied to its num_samples rows (prefix reuse).
            out = generate(self.model, prompts, hp.max_new_tokens, temperature=temperature, top_k=hp.top_k,
                           top_p=hp.top_p, eos_id=tok.eos_id, pad_id=tok.pad_id, seed=int(seed),
                           num_samples=num_samples, compile=hp.compile_rollouts)
        answer_ids = out.as_lists()
        B, device = len(prompt_ids), self.model.output.weight.device
        T = max(len(p) + len(a) for p, a in zip(prompt_ids, answer_ids))
        tokens = torch.full((B, T), tok.pad_id, dtype=torch.long)
        action_mask = torch.zeros((B, T - 1), dtype=torch.bool)
        for i, (p, a) in enumerate(zip(prompt_ids, answer_ids)):
            tokens[i, : len(p) + len(a)] = torch.tensor([*p, *a])
            action_mask[i, len(p) - 1 : len(p) + len(a) - 1] = True
        answers = [tok.decode([t for t in a if t != tok.eos_id]).strip() for a in answer_ids]
        repeat = lambda x: x.repeat_interleave(num_samples, dim=0)  # noqa: E731
        return Rollout(
            tokens=tokens.to(device), action_mask=action_mask.to(device), prompt_ids=prompt_ids,
            answer_ids=answer_ids, answers=answers,
            messages=[m for m in batch["messages"] for _ in range(num_samples)],
            is_safety=repeat(batch["is_safety"].to(device).bool()), index=repeat(batch["index"].to(device)),
            temperature=float(temperature),
        )

    def _setup_reward(self) -> None:
        if not self._reward_ready:
            self.reward.setup(self.device, self.tokenizer, self.device_mesh)
            self._reward_ready = True

    @torch.no_grad()
    def score(self, rollout: Rollout) -> dict[str, Tensor]:
        """The reward function's ``{"reward": (B,), parts...}`` for a rollout, checked."""
        self._setup_reward()
        parts = self.reward.score(rollout.messages, rollout.answers, rollout.prompt_ids, rollout.answer_ids,
                                  rollout.is_safety)
        r = parts.get("reward")
        B = rollout.tokens.size(0)
        if not isinstance(r, Tensor) or r.shape != (B,):
            raise ValueError(f"{type(self.reward).__name__}.score must return {{'reward': tensor of shape ({B},)}}, "
                             f"got {None if r is None else tuple(getattr(r, 'shape', ()))}")
        if not bool(torch.isfinite(r).all()):
            raise ValueError(f"{type(self.reward).__name__} returned non-finite rewards: {r.tolist()}")
        return {k: v.float().to(self.device) for k, v in parts.items()}

    def _chunk_size(self) -> int:
        return self.hparams.micro_batch_size or self.hparams.minibatch_size

    @torch.no_grad()
    def logprobs_of(self, model: Transformer, tokens: Tensor, lengths: Tensor) -> Tensor:
        """(B, T - 1) float32 log-probs of ``tokens[:, 1:]`` under ``model``, in chunks, each trimmed to
        its longest real sequence (``lengths`` (B,)); 0 beyond a row's end."""
        B, T = tokens.shape
        out = torch.zeros((B, T - 1), device=tokens.device)
        for sl in _chunks(B, self._chunk_size()):
            Tm = int(lengths[sl].max())
            x = tokens[sl, :Tm]
            out[sl, : Tm - 1] = token_logprobs(model(x[:, :-1]), x[:, 1:])
        return out

    @torch.no_grad()
    def values_of(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """(B, T - 1) float32 value V(s_t) of each action position's state."""
        assert self.value_model is not None
        B, T = tokens.shape
        out = torch.zeros((B, T - 1), device=tokens.device)
        for sl in _chunks(B, self._chunk_size()):
            Tm = int(lengths[sl].max())
            out[sl, : Tm - 1] = self.value_model.forward_all(tokens[sl, : Tm - 1])
        return out

    @torch.no_grad()
    def evaluate_rollout(self, rollout: Rollout, values: bool = True) -> dict[str, Tensor]:
        """``logprobs`` (policy), ``ref_logprobs`` (pi_0) and, for PPO, ``values``, each (B, T - 1).

        The policy's log-probs are recomputed with the training forward rather than taken from
        generation (KV-cache decoding rounds differently), so PPO's first ratio is exactly 1."""
        assert self.model is not None and self.ref_model is not None
        lengths = rollout.lengths
        was_training = self.model.training
        self.model.eval()
        try:
            out = {"logprobs": self.logprobs_of(self.model, rollout.tokens, lengths),
                   "ref_logprobs": self.logprobs_of(self.ref_model, rollout.tokens, lengths)}
            if values and self.value_model is not None:
                out["values"] = self.values_of(rollout.tokens, lengths)
        finally:
            self.model.train(was_training)
        return out

    # ---------------------------------------------------------------------------------- training
    def on_fit_start(self) -> None:
        from llama2_lightning.callbacks.ppo import PPOCallback
        from llama2_lightning.callbacks.rejection_sampling import RejectionSamplingCallback

        wanted = PPOCallback if self.hparams.algorithm == "ppo" else RejectionSamplingCallback
        found = [c for c in self.trainer.callbacks if isinstance(c, (PPOCallback, RejectionSamplingCallback))]
        if len(found) != 1 or not isinstance(found[0], wanted):
            raise ValueError(
                f"RLHFModule(algorithm={self.hparams.algorithm!r}) needs exactly one {wanted.__name__} in "
                f"trainer.callbacks to make its experience; found {[type(c).__name__ for c in found]}")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        exp, self.experience = self.experience, None
        if exp is None:
            raise RuntimeError("no experience for this batch: the experience callback (PPOCallback or "
                               "RejectionSamplingCallback) must run before training_step")
        if not torch.equal(exp.batch_index.cpu(), batch["index"].cpu()):
            raise RuntimeError("the experience was made from another prompt batch than this training step's")
        start = time.perf_counter()
        stats = self._ppo_update(exp) if isinstance(exp, PPOExperience) else self._sft_update(exp)
        stats["time/optimisation_s"] = time.perf_counter() - start
        stats.update(exp.stats)
        B = len(batch["prompt_ids"])
        # Per-rank numbers (each rank optimised on its own prompts): averaged over ranks when logged.
        self.log_dict({k if "/" in k else f"train/{k}": float(v) for k, v in stats.items()},
                      on_step=False, on_epoch=True, batch_size=B, sync_dist=True)
        return {"loss": torch.tensor(stats["loss"])}

    def _minibatches(self, n: int, seed: int, epoch: int) -> list[Tensor]:
        g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)  # a fresh order per PPO epoch
        order = torch.randperm(n, generator=g)
        return [order[sl] for sl in _chunks(n, self.hparams.minibatch_size)]

    def _step(self) -> dict[str, float]:
        """Clip each trained model's gradient norm separately, take the optimiser step, reset."""
        opt = self.optimizers()
        norms = {}
        clip = self.hparams.grad_clip
        for name, module in (("policy", self.model), ("value", self.value_model)):
            if module is None:
                continue
            params = [p for p in module.parameters() if p.grad is not None]
            if params:
                norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else float("inf"))
                norms[f"grad_norm_{name}"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return norms

    def _ppo_update(self, exp: PPOExperience) -> dict[str, float]:
        """Clipped PPO on policy and value model: ``ppo_epochs`` passes, one optimiser step per minibatch."""
        assert self.model is not None and self.value_model is not None
        hp = self.hparams
        sums: dict[str, float] = {}
        steps = 0
        for epoch in range(hp.ppo_epochs):
            for mb in self._minibatches(exp.tokens.size(0), exp.seed, epoch):
                n_tokens = exp.action_mask[mb].sum().clamp(min=1)
                acc: dict[str, float] = {}
                for sub in _chunks(len(mb), hp.micro_batch_size or len(mb)):
                    rows = mb[sub]
                    Tm = int(exp.lengths[rows].max())  # trim the minibatch's common padding
                    x = exp.tokens[rows, : Tm - 1]
                    mask = exp.action_mask[rows, : Tm - 1]
                    weight = mask.sum() / n_tokens  # micro-batch share of the minibatch's tokens
                    logits = self.model(x)  # (b, Tm - 1, V)
                    logprobs = token_logprobs(logits, exp.tokens[rows, 1:Tm])
                    pg_loss, pg = ppo_policy_loss(logprobs, exp.old_logprobs[rows, : Tm - 1],
                                                  exp.advantages[rows, : Tm - 1], mask, hp.clip_eps)
                    values = self.value_model.forward_all(x)  # (b, Tm - 1)
                    vf_loss, vf = ppo_value_loss(values, exp.old_values[rows, : Tm - 1], exp.returns[rows, : Tm - 1],
                                                 mask, hp.value_clip_eps)
                    # Disjoint models: the sum trains each on its own loss in one backward.
                    self.manual_backward((pg_loss + vf_loss) * weight)
                    w = float(weight)
                    pg_loss, vf_loss = pg_loss.detach(), vf_loss.detach()
                    for k, v in {"policy_loss": pg_loss, "value_loss": vf_loss, "loss": pg_loss + vf_loss,
                                 "clip_fraction": pg["clip_fraction"], "approx_kl": pg["approx_kl"],
                                 "ratio": pg["ratio_mean"], "value_clip_fraction": vf["clip_fraction"],
                                 "value": vf["value_mean"],
                                 "entropy": entropy_from_logits(logits.detach(), mask)}.items():
                        acc[k] = acc.get(k, 0.0) + w * float(v)
                acc.update(self._step())
                for k, v in acc.items():
                    sums[k] = sums.get(k, 0.0) + v
                steps += 1
        out = {k: v / steps for k, v in sums.items()}
        out["optimizer_steps"] = float(steps)
        return out

    def _sft_update(self, exp: SFTExperience) -> dict[str, float]:
        """Answer-only NLL on the pooled samples: ``sft_epochs`` passes, one optimiser step per minibatch."""
        assert self.model is not None
        hp = self.hparams
        input_ids, labels, lengths = exp.input_ids.to(self.device), exp.labels.to(self.device), exp.lengths
        sums: dict[str, float] = {}
        steps = 0
        for epoch in range(hp.sft_epochs):
            for mb in self._minibatches(input_ids.size(0), exp.seed, epoch):
                n_tokens = (labels[mb] != IGNORE_INDEX).sum().clamp(min=1)
                acc: dict[str, float] = {}
                for sub in _chunks(len(mb), hp.micro_batch_size or len(mb)):
                    rows = mb[sub]
                    Tm = int(lengths[rows].max())
                    loss, n, correct = answer_loss(self.model(input_ids[rows, :Tm]), labels[rows, :Tm])
                    weight = n / n_tokens
                    self.manual_backward(loss * weight)
                    acc["loss"] = acc.get("loss", 0.0) + float(loss.detach() * weight)
                    acc["token_accuracy"] = acc.get("token_accuracy", 0.0) + float(correct / n_tokens)
                acc.update(self._step())
                for k, v in acc.items():
                    sums[k] = sums.get(k, 0.0) + v
                steps += 1
        out = {k: v / steps for k, v in sums.items()}
        out["optimizer_steps"] = float(steps)
        return out

    # -------------------------------------------------------------------------------- evaluation
    def on_validation_epoch_start(self) -> None:
        for m in (self.val_reward, self.val_kl, self.val_kl_k3, self.val_length):
            m.reset()
        self._val_parts = {}
        self._val_rows = []

    def heldout_seed(self, batch_idx: int) -> int:
        """Sampling seed of held-out batch ``batch_idx``: the same at every validation (and in the
        pipeline report), so two evaluations differ by the policy only."""
        return self.hparams.val_seed * 7919 + batch_idx * 104729 + self.global_rank

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rollout = self.rollout(batch, seed=self.heldout_seed(batch_idx))
        parts = self.score(rollout)
        lp = self.evaluate_rollout(rollout, values=False)
        mask = rollout.action_mask
        kl = torch.where(mask, kl_penalty(lp["logprobs"], lp["ref_logprobs"], "k1"), 0.0).sum(1)  # (B,)
        kl3 = torch.where(mask, kl_penalty(lp["logprobs"], lp["ref_logprobs"], "k3"), 0.0).sum(1)  # (B,)
        B = rollout.tokens.size(0)
        self.val_reward.update(parts["reward"])
        self.val_kl.update(kl)
        self.val_kl_k3.update(kl3)
        self.val_length.update(rollout.answer_lengths.float())
        for k, v in parts.items():
            if k != "reward":
                self._val_parts.setdefault(k, []).extend(v.tolist())
        if len(self._val_rows) < self.hparams.log_samples:
            for i in range(min(B, self.hparams.log_samples - len(self._val_rows))):
                self._val_rows.append([rollout.messages[i][-1]["content"], rollout.answers[i],
                                       float(parts["reward"][i])])

    def on_validation_epoch_end(self) -> None:
        # MeanMetric.compute() already reduces over ranks (sync_dist then averages equal values);
        # the parts are per-rank means, averaged by log.
        self.log("val/reward", self.val_reward.compute(), prog_bar=True, sync_dist=True)
        self.log("val/kl", self.val_kl.compute(), prog_bar=True, sync_dist=True)
        self.log("val/kl_k3", self.val_kl_k3.compute(), sync_dist=True)
        self.log("val/response_length", self.val_length.compute(), sync_dist=True)
        for k, values in self._val_parts.items():
            self.log(f"val/reward_{k}", sum(values) / max(len(values), 1), sync_dist=True)
        self._log_sample_table()

    def _log_sample_table(self) -> None:
        if self._trainer is None or not self.trainer.is_global_zero or self.trainer.sanity_checking:
            return
        it = self.current_epoch
        self._sample_table.extend([it, *row] for row in self._val_rows)
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                # wandb tables are immutable once logged: each call logs every row so far.
                logger.log_table("rlhf_samples", columns=["iteration", "prompt", "answer", "reward"],
                                 data=self._sample_table)

    # ------------------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """One AdamW (or 8-bit AdamW) over the policy (lr) and the value model (value_lr), constant LR
        (paper, PPO)."""
        assert self.model is not None
        hp = self.hparams
        groups = [{**g, "lr": hp.lr} for g in param_groups(self.model, hp.weight_decay)]
        if self.value_model is not None:
            groups += [{**g, "lr": hp.value_lr or hp.lr} for g in param_groups(self.value_model, hp.weight_decay)]
        groups = [g for g in groups if g["params"]]
        return build_optimizer(groups, hp.optimizer, hp.lr, tuple(hp.betas), hp.eps)

    # ------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain dicts, so `convert`, `chat` and the next stage's init_from read the policy (model.*)
        # with weights_only loading.
        checkpoint["llama_config"] = self.config.to_dict()
        if self.value_model is not None:
            checkpoint["value_config"] = self.value_model.config.to_dict()

    def on_train_start(self) -> None:
        if self.hparams.algorithm == "ppo" and (self.hparams.temperature != 1.0 or self.hparams.top_p < 1.0
                                                or self.hparams.top_k is not None):
            rank_zero_warn("RLHFModule: PPO samples with temperature/top_p/top_k other than 1/1/None, so rollouts "
                           "do not come from the policy whose log-probs the ratio uses")


__all__ = ["RLHFModule", "Rollout", "PPOExperience", "SFTExperience", "token_logprobs", "gathered"]
