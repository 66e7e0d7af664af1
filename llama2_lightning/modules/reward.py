"""Reward-model training: binary ranking loss with a preference-rating margin (paper section 3.2.2).

The reward model is :class:`~llama2_lightning.scalar_model.ScalarModel`, the chat model's ``Transformer``
trunk with its LM head dropped plus a scalar head, and it is trained on preference pairs with

    L = -log sigmoid(r(x, y_chosen) - r(x, y_rejected) - m(r))

where the margin ``m(r)`` grows with the annotators' rating (``rlhf.ranking.MARGINS``). The
:class:`~llama2_lightning.data.preference.PreferenceDataModule` stacks each batch's ``B`` chosen
sides over its ``B`` rejected sides, so both are scored in one forward of ``2B`` sequences: one
pass through the (possibly sharded) trunk per step, and both sides see the same weights.

Checkpoint layout (what ``scoring.load_reward_model`` and ``export-rm`` read): the state dict holds
the trunk under ``model.trunk.`` (Meta's parameter names, no ``output.weight``) and the head as
``model.head.score.weight`` of shape ``(1, dim)``; ``checkpoint["llama_config"]`` is the trunk's
``LlamaConfig.to_dict()`` and ``checkpoint["reward_model"]`` a plain dict with those prefixes, the
tokenizer path and its pad id (:data:`REWARD_CHECKPOINT_INFO` lists the keys). The saved
hyperparameters name the architecture (``model``) instead of ``init_from``, so evaluating a reward
model never needs the checkpoint it was initialised from.

Shape letters: B pairs in a batch, T sequence length.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchmetrics import Metric

from llama2_lightning.modules.args import FinetuneArgs, OptimizerArgs, ShardingArgs
from llama2_lightning.modules.common import build_config, build_scalar_model, cosine_adamw, save_grouped_hyperparameters
from llama2_lightning.modules.finetune import apply_finetune, finetune_group, merge_adapters, restore_adapters
from llama2_lightning.rlhf.ranking import MARGINS, MarginTable, margin_for, ranking_loss
from llama2_lightning.scalar_model import ScalarModel

DEFAULT_OPTIMIZER = OptimizerArgs(lr=1e-5, warmup_steps=5, warmup_ratio=0.03, min_lr_ratio=0.1)  # paper, 3.2.2

# Prefixes of the reward model's tensors in a RewardModule state dict (module docstring).
TRUNK_PREFIX = "model.trunk."
HEAD_KEY = "model.head.score.weight"
# Keys of checkpoint["reward_model"]; all values are plain Python data so weights_only loading works.
REWARD_CHECKPOINT_INFO = ("trunk_prefix", "head_key", "tokenizer_path", "pad_id", "margin", "init_from")
# Accuracy is reported per rating; pairs without one (e.g. Anthropic HH) are "none".
MARGIN_GROUPS: tuple[str, ...] = (*MARGINS["small"], "none")


def _metric_name(name: str) -> str:
    """Source names come from file names; keep logger keys to one path level."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "source"


class RankingMetrics(Metric):
    """Pairwise accuracy (``r_chosen > r_rejected``; ties count as wrong), mean score gap
    ``r_chosen - r_rejected`` and mean ranking loss over an epoch, overall, per margin label and
    per data source. Sums are reduced across processes, so every rank computes the global value.

    ``compute()`` returns ``{"accuracy", "score_gap", "loss", "accuracy_by_label/<label>",
    "accuracy_by_source/<name>"}``; a label or source with no pair in the epoch is left out rather
    than reported as 0 or NaN.
    """

    full_state_update = False

    def __init__(self, source_names: Sequence[str] = ()) -> None:
        super().__init__()
        names = [_metric_name(n) for n in source_names]
        # Two files with the same stem must not log to the same key.
        self.source_names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
        n_labels, n_sources = len(MARGIN_GROUPS), len(self.source_names)
        self.add_state("pairs", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("correct", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("gap_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("loss_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("label_pairs", torch.zeros(n_labels, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("label_correct", torch.zeros(n_labels, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("source_pairs", torch.zeros(n_sources, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("source_correct", torch.zeros(n_sources, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, r_chosen: Tensor, r_rejected: Tensor, labels: Sequence[str | None], loss: Tensor,
               sources: Tensor | None = None) -> None:
        """r_chosen, r_rejected: (B,) scores; labels: B margin labels or None; loss: the batch's
        mean ranking loss (a scalar); sources: (B,) long indices into ``source_names``."""
        gap = (r_chosen - r_rejected).detach().double()  # (B,)
        correct = (gap > 0).double()  # (B,)
        B = gap.numel()
        self.pairs += B
        self.correct += correct.sum()
        self.gap_sum += gap.sum()
        self.loss_sum += loss.detach().double() * B
        group = torch.tensor([MARGIN_GROUPS.index(lab if lab is not None else "none") for lab in labels],
                             device=gap.device)  # (B,)
        self.label_pairs += torch.bincount(group, minlength=len(MARGIN_GROUPS)).double()
        self.label_correct += torch.bincount(group, weights=correct, minlength=len(MARGIN_GROUPS))
        if sources is not None and self.source_names:
            sources = sources.to(gap.device)
            self.source_pairs += torch.bincount(sources, minlength=len(self.source_names)).double()
            self.source_correct += torch.bincount(sources, weights=correct, minlength=len(self.source_names))

    def compute(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if self.pairs == 0:
            return out
        out["accuracy"] = (self.correct / self.pairs).float()
        out["score_gap"] = (self.gap_sum / self.pairs).float()
        out["loss"] = (self.loss_sum / self.pairs).float()
        for i, label in enumerate(MARGIN_GROUPS):
            if self.label_pairs[i] > 0:
                out[f"accuracy_by_label/{label}"] = (self.label_correct[i] / self.label_pairs[i]).float()
        for i, name in enumerate(self.source_names):
            if self.source_pairs[i] > 0:
                out[f"accuracy_by_source/{name}"] = (self.source_correct[i] / self.source_pairs[i]).float()
        return out


class RewardModule(L.LightningModule):
    """Train a helpfulness or safety reward model (trunk + scalar head) on preference pairs.

    Args:
        model: preset name or ``LlamaConfig`` fields; ``None`` (the usual) takes the config stored
            with ``init_from``.
        model_overrides: fields to change on it (e.g. ``max_seq_len``).
        init_from: the chat model to start from (paper: the pretrained chat checkpoint, SFT or
            RLHF), any format; its LM head is dropped and a fresh scalar head added. A reward-model
            checkpoint written by this module is also accepted (head kept), to continue or evaluate one.
        margin: margin table for m(r): ``"small"`` (the paper's choice), ``"large"`` or ``"none"``.
        optimizer: AdamW and its schedule (paper: peak 1e-5, 5e-6 for 70B; warm-up over 3% of the
            optimiser steps, at least 5: ``warmup_ratio`` 0.03, ``warmup_steps`` 5; cosine to 10%),
            spanning the whole run (one epoch in the paper).
        sharding: as in ``PretrainModule``.
        finetune: which trunk weights train (``SFTModule``'s); the scalar head always trains.
    """

    def __init__(
        self,
        model: str | dict[str, Any] | None = None,
        model_overrides: dict[str, Any] | None = None,
        init_from: str | None = None,
        margin: MarginTable = "small",
        optimizer: OptimizerArgs = DEFAULT_OPTIMIZER,
        sharding: ShardingArgs = ShardingArgs(),
        finetune: FinetuneArgs = FinetuneArgs(),
    ) -> None:
        super().__init__()
        if margin not in ("small", "large", "none"):
            raise ValueError(f"margin: unknown margin table {margin!r}; allowed: small, large, none")
        self.optimizer_args, self.sharding = save_grouped_hyperparameters(self, optimizer, DEFAULT_OPTIMIZER, sharding)
        self.config = build_config(model, model_overrides, init_from)
        self.finetune = finetune_group(self, "finetune", finetune, self.config)
        self.model: ScalarModel | None = None
        self._make_metrics([])

    def _make_metrics(self, source_names: Sequence[str]) -> None:
        self.train_metrics = RankingMetrics(source_names)
        self.val_metrics = RankingMetrics(source_names)
        self.test_metrics = RankingMetrics(source_names)

    def setup(self, stage: str) -> None:
        # Per-source accuracy needs the data module's source names, known only once it exists.
        dm = self.trainer.datamodule if self._trainer is not None else None
        names = list(getattr(dm, "source_names", None) or [])
        if names != self.val_metrics.source_names:
            self._make_metrics(names)

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:
            return
        # On the meta device, sharded, then each rank materialises and loads its own shard only.
        self.model = build_scalar_model(self.config, self.hparams.init_from, device_mesh=self.device_mesh,
                                        **vars(self.sharding))
        apply_finetune(self.model.trunk, self.finetune, "finetune", self.device_mesh)  # the head is outside the trunk

    def forward(self, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Scores (N,) float32 of N sequences (N, T), read at each row's last real token."""
        assert self.model is not None, "configure_model() has not run"
        return self.model(tokens, attention_mask)

    # ------------------------------------------------------------------ steps
    def _step(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, r_chosen (B,), r_rejected (B,)) with chosen and rejected in one forward."""
        labels = batch["margin_label"]
        B = len(labels)
        if batch["input_ids"].size(0) != 2 * B:
            raise ValueError(f"expected 2 x {B} sequences (chosen rows, then rejected rows) for {B} margin labels, "
                             f"got input_ids of shape {tuple(batch['input_ids'].shape)}")
        scores = self(batch["input_ids"], batch["attention_mask"])  # (2B,)
        r_chosen, r_rejected = scores[:B], scores[B:]  # (B,), (B,)
        margin = margin_for(labels, self.hparams.margin).to(scores.device)  # (B,)
        return ranking_loss(r_chosen, r_rejected, margin), r_chosen, r_rejected

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, r_c, r_r = self._step(batch)
        gap = (r_c - r_r).detach()  # (B,)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/accuracy", (gap > 0).float().mean(), prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/score_gap", gap.mean(), on_step=True, on_epoch=False)
        self.train_metrics.update(r_c, r_r, batch["margin_label"], loss, batch.get("source"))
        return loss

    def on_train_epoch_end(self) -> None:
        # Per-label and per-source accuracy need more pairs than a step has: logged once per epoch.
        self._log_metrics(self.train_metrics, "train_epoch")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, r_c, r_r = self._step(batch)
        self.val_metrics.update(r_c, r_r, batch["margin_label"], loss, batch.get("source"))

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, r_c, r_r = self._step(batch)
        self.test_metrics.update(r_c, r_r, batch["margin_label"], loss, batch.get("source"))

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")

    def _log_metrics(self, metrics: RankingMetrics, prefix: str) -> None:
        values = metrics.compute()  # already reduced over ranks
        # Evaluation runs under inference_mode; states reset there would be inference tensors that
        # the next training or validation update could not modify in place.
        with torch.inference_mode(False):
            metrics.reset()
        for name, value in values.items():
            self.log(f"{prefix}/{name}", value, prog_bar=name == "accuracy", sync_dist=False)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        assert self.model is not None
        # One epoch in the paper: the schedule spans the whole run, whatever its length.
        return cosine_adamw(self, [(self.model, self.optimizer_args.lr)], self.optimizer_args,
                            total_steps=int(self.trainer.estimated_stepping_batches))

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain data only, so scoring and export can rebuild the model with weights_only loading.
        checkpoint["llama_config"] = self.config.to_dict()
        dm = self.trainer.datamodule if self._trainer is not None else None
        tokenizer = getattr(dm, "tokenizer", None)
        checkpoint["reward_model"] = {
            "trunk_prefix": TRUNK_PREFIX,
            "head_key": HEAD_KEY,
            "tokenizer_path": str(getattr(dm, "tokenizer_path", "")) or None,
            "pad_id": int(tokenizer.pad_id) if tokenizer is not None else None,
            "margin": self.hparams.margin,
            "init_from": self.hparams.init_from,  # provenance only; the weights are all in this file
        }
        # `validate/test --ckpt_path` rebuild the module from these hyperparameters (LightningCLI
        # applies them over the config): record the architecture itself and drop init_from, so a
        # reward-model checkpoint stays usable after the SFT checkpoint it started from is gone.
        hparams = checkpoint.get("hyper_parameters")
        if isinstance(hparams, dict):  # a copy of self.hparams, safe to edit
            hparams.update(model=self.config.to_dict(), model_overrides=None, init_from=None)
        merge_adapters(self, checkpoint)  # LoRA: merged trunk weights under Meta names, adapters beside them

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_adapters(self, checkpoint)  # a resumed or re-evaluated LoRA run: its adapters, not a merge


__all__ = ["RewardModule", "RankingMetrics", "MARGIN_GROUPS", "TRUNK_PREFIX", "HEAD_KEY"]
