"""RLHF: PPO and rejection-sampling fine-tuning of the chat policy (Touvron et al. 2023, section 3.2.3).

One training epoch is one RLHF iteration over one batch of prompts. The trainer's one experience
callback decides the algorithm: ``training_step`` asks it to make experience from the batch
(``PPOCallback.make_experience``: rollouts, reward - beta * KL, GAE; ``RejectionSamplingCallback.
make_experience``: best of K, pooled over rounds), then runs the matching update here (``ppo_update``:
clipped PPO on policy and value model; ``sft_update``: answer-only NLL on the pool); read each
callback's numbered steps beside its update. The callbacks hold what makes experience (beta, the seed
stream, the pool); this module owns the models, the losses and the optimiser. The data contract is
``rlhf/experience.py``; sampling and scoring are ``rlhf/rollout.py``, which the pipeline report uses too.

Resume: a checkpoint is written between iterations, where the only state is the weights, the optimiser
and the callbacks' ``state_dict``; the prompts, sampling and minibatch seeds of iteration i are pure
functions of i, so a run resumed with ``--ckpt_path`` continues exactly (tested).

Models: ``model``, the policy (from ``init_from``, the SFT checkpoint); ``ref_model``, the frozen
initial policy pi_0 of the KL term; ``value_model`` (PPO only), trunk + scalar head; ``reward``, any
``RewardFunction``, outside the state dict. The checkpoint's ``model.*`` weights and ``llama_config``
are the policy's, so an RLHF checkpoint is an ``init_from`` for the next round, ``chat`` or ``convert``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor
from torchmetrics import MeanMetric

from llama2_lightning.checkpoint import read_config
from llama2_lightning.config import LlamaConfig
from llama2_lightning.dtypes import resolve_dtype
from llama2_lightning.losses import IGNORE_INDEX, answer_loss
from llama2_lightning.model import Transformer
from llama2_lightning.modules.args import FinetuneArgs, OptimizerArgs, ShardingArgs
from llama2_lightning.modules.common import (
    build_config, build_scalar_model, build_transformer, cosine_adamw, save_grouped_hyperparameters,
)
from llama2_lightning.modules.finetune import apply_finetune, finetune_group, merge_adapters, restore_adapters
from llama2_lightning.reward_functions import FrozenDType, RewardFunction
from llama2_lightning.rlhf.experience import (
    ExperienceCallback, PPOExperience, Rollout, SFTExperience, heldout_seed, token_logprobs,
)
from llama2_lightning.rlhf.global_stats import lockstep_batches, sum_over_ranks
from llama2_lightning.rlhf.kl import sequence_kl
from llama2_lightning.rlhf.ppo import entropy_from_logits, ppo_policy_loss, ppo_value_loss
from llama2_lightning.rlhf.rollout import chunks, logprobs_of, sample_rollout, score_rollout, values_of
from llama2_lightning.scalar_model import ScalarModel
from llama2_lightning.tensor_parallel import data_parallel_group, data_parallel_rank
from llama2_lightning.tokenizer import Tokenizer

DEFAULT_OPTIMIZER = OptimizerArgs(lr=1e-6)  # paper, PPO: constant LR (no decay_steps: no decay)


class RLHFModule(L.LightningModule):
    """Policy, frozen reference, value model and reward for Llama 2's RLHF stage (module docstring).

    Args:
        init_from: the SFT checkpoint (any format): the policy and the reference pi_0.
        model / model_overrides: preset or config dict (``None``: the config stored with ``init_from``).
        reward: the sequence reward, a ``RewardFunction`` (``class_path`` in YAML).
        value_init_from: PPO's value model: a reward checkpoint (trunk and head) or a language-model
            checkpoint (new head); ``None`` starts from ``init_from`` with a new head.
        frozen_dtype: dtype of the reference model (``bfloat16`` halves it; the KL then starts a
            little above 0).
        max_new_tokens / temperature / top_p / top_k: how the policy answers, in rollouts and on
            held-out prompts. PPO's ratio needs samples from the policy itself: keep 1 / 1 / None for
            PPO (rejection sampling has its own temperature schedule).
        compile_rollouts: sample with ``generate(compile=True)``: on CUDA one CUDA graph per decode step
            (6-10x eager for a 1B model on an H200, ``benchmarks/README.md``); on CPU rebuilt after every
            update. Needs an unsharded policy.
        rollout_batch_size: sequences decoded at once per data-parallel replica (prompts x samples, rounded
            down to whole prompts, at least one prompt's samples), which bounds the KV cache; ``None``:
            every prompt of the rank's batch at once. The ``memory`` command reads it.
        optimizer: AdamW for the policy (paper, PPO: lr 1e-6 constant, 0.9/0.95, eps 1e-5, wd 0.1).
        value_lr: the value model's peak learning rate (default ``optimizer.lr``).
        grad_clip: gradient-norm clip, applied to policy and value model separately (paper: 1.0).
        minibatch_size: sequences per optimiser step per data-parallel replica (the step's gradient is the
            token mean over every replica's minibatch: dp x minibatch_size rows; paper: 64 in all).
        micro_batch_size: sequences per forward/backward inside a minibatch (gradient accumulation);
            ``None``: the whole minibatch.
        ppo_epochs: passes over each rollout (paper: 1). sft_epochs: passes over the pool per round.
        clip_eps: PPO ratio clip (paper: 0.2). value_clip_eps: value clip, in reward units.
        val_seed: sampling seed of the held-out evaluation, the same at every validation.
        log_samples: held-out (prompt, answer, reward) rows logged per validation (wandb Table).
        sharding: FSDP2 mixed precision when sharded, activation checkpointing.
        finetune: which policy weights train (``SFTModule``'s); pi_0 is never adapted.
        value_finetune: the same for the value model's trunk (its head always trains); ``None``: ``finetune``.
    """

    def __init__(
        self,
        init_from: str | None = None,
        model: str | dict[str, Any] | None = None,
        model_overrides: dict[str, Any] | None = None,
        reward: RewardFunction | None = None,
        value_init_from: str | None = None,
        frozen_dtype: FrozenDType | None = None,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        compile_rollouts: bool = False,
        rollout_batch_size: int | None = None,
        optimizer: OptimizerArgs = DEFAULT_OPTIMIZER,
        value_lr: float | None = None,
        grad_clip: float | None = 1.0,
        minibatch_size: int = 64,
        micro_batch_size: int | None = None,
        ppo_epochs: int = 1,
        sft_epochs: int = 1,
        clip_eps: float = 0.2,
        value_clip_eps: float = 0.2,
        val_seed: int = 1234,
        log_samples: int = 4,
        sharding: ShardingArgs = ShardingArgs(),
        finetune: FinetuneArgs = FinetuneArgs(),
        value_finetune: FinetuneArgs | None = None,
    ) -> None:
        super().__init__()
        if reward is None:
            raise ValueError("reward: give a RewardFunction, e.g. "
                             "class_path: llama2_lightning.reward_functions.Llama2DualReward")
        if model is None and init_from is None:
            raise ValueError("RLHFModule: set init_from (the SFT checkpoint) or model (a preset, random weights)")
        if frozen_dtype is not None and frozen_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"frozen_dtype {frozen_dtype!r}; allowed: float32, bfloat16, float16 or null")
        for name, value in (("max_new_tokens", max_new_tokens), ("minibatch_size", minibatch_size),
                            ("micro_batch_size", 1 if micro_batch_size is None else micro_batch_size),
                            ("rollout_batch_size", 1 if rollout_batch_size is None else rollout_batch_size),
                            ("ppo_epochs", ppo_epochs), ("sft_epochs", sft_epochs)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1 (micro_batch_size, rollout_batch_size: or null), got {value}")
        # The reward object stays out of hparams: checkpoints are loaded with weights_only=True and must
        # hold plain data only (the CLI's config.yaml still records it).
        self.optimizer_args, self.sharding = save_grouped_hyperparameters(self, optimizer, DEFAULT_OPTIMIZER, sharding,
                                                                          ignore=["reward"])
        self.automatic_optimization = False  # several PPO / SFT steps per training step
        try:
            self.config: LlamaConfig = build_config(model, model_overrides, init_from)
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"RLHFModule: init_from={init_from!r} not found ({err}); train the SFT model first (e.g. "
                "`llama2-lightning fit --config configs/sft/tiny.yaml`) or pass --model.init_args.init_from PATH"
            ) from None
        self.finetune = finetune_group(self, "finetune", finetune, self.config)
        # value_init_from's depth is checked when it is read (configure_model)
        self.value_finetune = finetune_group(self, "value_finetune", value_finetune,
                                             None if value_init_from else self.config, default=None) or self.finetune
        self.reward = reward
        self.model: Transformer | None = None
        self.ref_model: Transformer | None = None
        self.value_model: ScalarModel | None = None
        # Set from trainer.callbacks at setup; set it yourself to use the module without a Trainer.
        self.experience_callback: ExperienceCallback | None = None
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
            tok = getattr(self.trainer.datamodule if self._trainer is not None else None, "tokenizer", None)
            if tok is None:
                raise RuntimeError("RLHFModule needs a tokenizer: use PromptDataModule, or set module.tokenizer")
            self._tokenizer = tok
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    def setup(self, stage: str) -> None:
        # The callback decides the algorithm (and so whether configure_model builds a value model);
        # evaluating a policy alone needs none.
        if stage == "fit" or any(isinstance(c, ExperienceCallback) for c in self.trainer.callbacks):
            self.experience_callback = ExperienceCallback.find(self.trainer.callbacks)
        dm = self.trainer.datamodule
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
        hp, mesh, sh = self.hparams, self.device_mesh, self.sharding
        # Each model is built on the meta device, sharded, then every rank materialises and loads its shard.
        policy = build_transformer(self.config, hp.init_from, sh.activation_checkpointing, mesh, sh.param_dtype,
                                   sh.reduce_dtype)
        # pi_0, frozen and in its own dtype (no mixed precision): the initial policy, whatever its weights
        ref = build_transformer(self.config, hp.init_from, False, mesh, None, None, dtype=resolve_dtype(hp.frozen_dtype))
        if not hp.init_from:
            ref.load_state_dict(policy.state_dict())
        ref.requires_grad_(False)
        ref.eval()
        apply_finetune(policy, self.finetune, "finetune", mesh)  # after pi_0 took the un-adapted weights
        value = None
        if self.experience_callback is not None and self.experience_callback.uses_value_model:
            config = read_config(hp.value_init_from) if hp.value_init_from else self.config
            value = build_scalar_model(config, hp.value_init_from or hp.init_from, sh.activation_checkpointing, mesh,
                                       sh.param_dtype, sh.reduce_dtype)
            apply_finetune(value.trunk, self.value_finetune, "value_finetune", mesh)
        self.model, self.ref_model, self.value_model = policy, ref, value

    def train(self, mode: bool = True) -> RLHFModule:
        super().train(mode)
        if self.ref_model is not None:
            self.ref_model.eval()  # Lightning puts the whole module in train mode; pi_0 stays frozen
        return self

    # ----------------------------------------------------------- what the experience callbacks call
    def rollout(self, batch: dict[str, Any], seed: int, temperature: float | None = None,
                num_samples: int = 1) -> Rollout:
        """``num_samples`` answers per prompt from the current policy (``rlhf.rollout.sample_rollout``)."""
        assert self.model is not None, "configure_model() has not run"
        hp = self.hparams
        return sample_rollout(self.model, self.tokenizer, batch, seed, max_new_tokens=hp.max_new_tokens,
                              temperature=hp.temperature if temperature is None else temperature, top_p=hp.top_p,
                              top_k=hp.top_k, num_samples=num_samples, compile=hp.compile_rollouts,
                              batch_size=hp.get("rollout_batch_size"))

    def score(self, rollout: Rollout) -> dict[str, Tensor]:
        """The reward function's ``{"reward": (B,), parts...}`` for a rollout, checked."""
        if not self._reward_ready:
            self.reward.setup(self.device, self.tokenizer, self.device_mesh)
            self._reward_ready = True
        return score_rollout(self.reward, rollout)

    @torch.no_grad()
    def evaluate_rollout(self, rollout: Rollout) -> dict[str, Tensor]:
        """``logprobs`` (policy), ``ref_logprobs`` (pi_0) and, with a value model, ``values``, each (B, T - 1).

        The policy's log-probs are recomputed with the training forward rather than taken from
        generation (KV-cache decoding rounds differently), so PPO's first ratio is exactly 1."""
        assert self.model is not None and self.ref_model is not None
        lengths, chunk = rollout.lengths, self.hparams.micro_batch_size or self.hparams.minibatch_size
        group = data_parallel_group(self._trainer)  # ranks with fewer rows still join every sharded forward
        was_training = self.model.training
        self.model.eval()
        try:
            out = {"logprobs": logprobs_of(self.model, rollout.tokens, lengths, chunk, group),
                   "ref_logprobs": logprobs_of(self.ref_model, rollout.tokens, lengths, chunk, group)}
            if self.value_model is not None:
                out["values"] = values_of(self.value_model, rollout.tokens, lengths, chunk, group)
        finally:
            self.model.train(was_training)
        return out

    # ---------------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        assert self.experience_callback is not None, "setup() has not found the experience callback"
        # 1. experience from this batch: the callback samples, scores and shapes (its numbered steps)
        exp = self.experience_callback.make_experience(self.trainer, self, batch)
        # 2. the update that matches it
        start = time.perf_counter()
        stats = self.ppo_update(exp) if isinstance(exp, PPOExperience) else self.sft_update(exp)
        stats["time/optimisation_s"] = time.perf_counter() - start
        # 3. log, averaged over ranks: the experience's stats are already global means (equal on every
        #    rank); the update's are each rank's share of the global minibatch means (``_optimise``)
        stats.update(exp.stats)
        self.log_dict({k if "/" in k else f"train/{k}": float(v) for k, v in stats.items()},
                      on_step=False, on_epoch=True, batch_size=len(batch["prompt_ids"]), sync_dist=True)
        return {"loss": torch.tensor(stats["loss"])}

    def ppo_update(self, exp: PPOExperience) -> dict[str, float]:
        """Clipped PPO on policy and value model (``PPOCallback.make_experience`` made ``exp``)."""
        assert self.model is not None and self.value_model is not None
        hp = self.hparams

        def loss_of(rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            # 1. trim the rows' common padding
            Tm = int(exp.lengths[rows].max())
            x, mask = exp.tokens[rows, : Tm - 1], exp.action_mask[rows, : Tm - 1]
            # 2. the clipped policy loss on the new log-probs of the sampled tokens
            logits = self.model(x)  # (b, Tm - 1, V)
            logprobs = token_logprobs(logits, exp.tokens[rows, 1:Tm])
            pg_loss, pg = ppo_policy_loss(logprobs, exp.old_logprobs[rows, : Tm - 1], exp.advantages[rows, : Tm - 1],
                                          mask, hp.clip_eps)
            # 3. the clipped value loss towards the GAE returns
            values = self.value_model.forward_all(x)  # (b, Tm - 1)
            vf_loss, vf = ppo_value_loss(values, exp.old_values[rows, : Tm - 1], exp.returns[rows, : Tm - 1], mask,
                                         hp.value_clip_eps)
            # Disjoint models: the sum trains each on its own loss in one backward.
            return pg_loss + vf_loss, {
                "policy_loss": pg_loss, "value_loss": vf_loss, "clip_fraction": pg["clip_fraction"],
                "approx_kl": pg["approx_kl"], "ratio": pg["ratio_mean"], "value_clip_fraction": vf["clip_fraction"],
                "value": vf["value_mean"], "entropy": entropy_from_logits(logits.detach(), mask)}

        return self._optimise(exp.action_mask, hp.ppo_epochs, exp.seed, loss_of)

    def sft_update(self, exp: SFTExperience) -> dict[str, float]:
        """Answer-only NLL on the pooled samples (``RejectionSamplingCallback.make_experience`` made ``exp``)."""
        assert self.model is not None
        input_ids, labels = exp.input_ids.to(self.device), exp.labels.to(self.device)

        def loss_of(rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            Tm = int(exp.lengths[rows].max())  # trim the rows' common padding
            loss, n, correct = answer_loss(self.model(input_ids[rows, :Tm]), labels[rows, :Tm])
            return loss, {"token_accuracy": correct / n.clamp(min=1)}

        return self._optimise(labels != IGNORE_INDEX, self.hparams.sft_epochs, exp.seed, loss_of)

    def _optimise(self, token_mask: Tensor, epochs: int, seed: int,
                  loss_of: Callable[[Tensor], tuple[Tensor, dict[str, Tensor]]]) -> dict[str, float]:
        """``epochs`` passes over the rows of ``token_mask`` (N, T), a fresh shuffled order per pass, one
        optimiser step per minibatch. A step's gradient is the token mean over the *global* minibatch
        (every data-parallel rank's rows): each micro-batch's mean loss is weighted by its tokens over
        the global minibatch's tokens, times the data-parallel size that the gradient all-reduce
        averages over. Every rank takes the same number of steps and micro-batches (``lockstep_batches``:
        a rank with fewer rows repeats some with weight 0), so uneven shares never leave a rank waiting
        in a collective. Returns the mean stats per step (per-rank shares of the global means: the
        logged mean over ranks is the global one)."""
        hp = self.hparams
        group = data_parallel_group(self._trainer)
        dp = torch.distributed.get_world_size(group) if torch.distributed.is_initialized() else 1
        device = token_mask.device
        sums: dict[str, float] = {}
        steps = 0
        for epoch in range(epochs):
            g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
            order = torch.randperm(token_mask.size(0), generator=g)
            minibatches = [order[sl] for sl in chunks(len(order), hp.minibatch_size)]
            for [mb], mb_weight in lockstep_batches(minibatches, 1, group, device):
                # the global minibatch's loss terms: every rank's tokens (a padding minibatch has none)
                n_tokens = sum_over_ranks(token_mask[mb].sum() * mb_weight, group).clamp(min=1)
                micro = [mb[sl] for sl in chunks(len(mb), hp.micro_batch_size or len(mb))]
                acc: dict[str, float] = {}
                for [rows], w in lockstep_batches(micro, 1, group, device):
                    loss, stats = loss_of(rows)
                    weight = token_mask[rows].sum() * (dp * w * mb_weight) / n_tokens
                    self.manual_backward(loss * weight)
                    share = float(weight)
                    for k, v in {"loss": loss, **stats}.items():
                        acc[k] = acc.get(k, 0.0) + share * float(v.detach())
                acc.update(self._step())
                for k, v in acc.items():
                    sums[k] = sums.get(k, 0.0) + v
                steps += 1
        return {**{k: v / steps for k, v in sums.items()}, "optimizer_steps": float(steps)}

    def _step(self) -> dict[str, float]:
        """Clip each trained model's gradient norm separately, take the optimiser step, reset."""
        opt, clip, norms = self.optimizers(), self.hparams.grad_clip, {}
        for name, module in (("policy", self.model), ("value", self.value_model)):
            params = [p for p in module.parameters() if p.grad is not None] if module is not None else []
            if params:
                norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else float("inf"))
                norms[f"grad_norm_{name}"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.lr_schedulers().step()
        return norms

    # -------------------------------------------------------------------------------- evaluation
    def on_validation_epoch_start(self) -> None:
        for m in (self.val_reward, self.val_kl, self.val_kl_k3, self.val_length):
            m.reset()
        self._val_parts = {}
        self._val_rows = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # 1. sample and score held-out answers with seeds fixed per batch
        # seeded by the data-parallel replica, not the process: a TP group samples as one (its first
        # rank's draw), and the held-out answers do not depend on the TP size
        rollout = self.rollout(batch, seed=heldout_seed(self.hparams.val_seed, batch_idx,
                                                        data_parallel_rank(self._trainer) if self._trainer else 0))
        parts = self.score(rollout)
        # 2. their KL to pi_0
        lp, mask = self.evaluate_rollout(rollout), rollout.action_mask
        self.val_reward.update(parts["reward"])
        self.val_kl.update(sequence_kl(lp["logprobs"], lp["ref_logprobs"], mask))
        self.val_kl_k3.update(sequence_kl(lp["logprobs"], lp["ref_logprobs"], mask, "k3"))
        self.val_length.update(rollout.answer_lengths.float())
        for k, v in parts.items():
            if k != "reward":
                self._val_parts.setdefault(k, []).extend(v.tolist())
        for i in range(min(rollout.tokens.size(0), self.hparams.log_samples - len(self._val_rows))):
            self._val_rows.append([rollout.messages[i][-1]["content"], rollout.answers[i], float(parts["reward"][i])])

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
        self._sample_table.extend([self.current_epoch, *row] for row in self._val_rows)
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                # wandb tables are immutable once logged: each call logs every row so far.
                logger.log_table("rlhf_samples", columns=["iteration", "prompt", "answer", "reward"],
                                 data=self._sample_table)

    # ------------------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        """One optimiser over policy (``optimizer.lr``) and value model (``value_lr``); the cosine spans
        ``optimizer.decay_steps`` optimiser steps, none by default (constant after warm-up, the paper)."""
        assert self.model is not None
        args = self.optimizer_args
        return cosine_adamw(self, [(self.model, args.lr), (self.value_model, self.hparams.value_lr or args.lr)],
                            args, total_steps=0)

    # ------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain dicts, so `convert`, `chat` and the next stage's init_from read the policy (model.*)
        # with weights_only loading.
        checkpoint["llama_config"] = self.config.to_dict()
        if self.value_model is not None:
            checkpoint["value_config"] = self.value_model.config.to_dict()
        merge_adapters(self, checkpoint)  # LoRA: merged policy / value weights under Meta names

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_adapters(self, checkpoint)


__all__ = ["RLHFModule"]
