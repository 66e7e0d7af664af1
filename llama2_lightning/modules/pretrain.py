"""Pretraining: next-token cross-entropy on packed token windows (paper section 2.2)."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchmetrics import MeanMetric

from llama2_lightning.losses import IGNORE_INDEX
from llama2_lightning.model import Transformer
from llama2_lightning.modules.args import OptimizerArgs, ShardingArgs
from llama2_lightning.modules.common import (
    build_config, build_transformer, cosine_adamw, save_grouped_hyperparameters, unpack_lm_batch,
)

DEFAULT_OPTIMIZER = OptimizerArgs(lr=3e-4, warmup_steps=2000, min_lr_ratio=0.1)  # paper, section 2.2
from llama2_lightning.tensor_parallel import cross_entropy, loss_backward_context


class PretrainModule(L.LightningModule):
    """Train a Llama 2 model from scratch (or continue from ``init_from``).

    Args:
        model: preset name or full ``LlamaConfig`` fields.
        model_overrides: fields to change on the preset (e.g. ``vocab_size`` to match a tokenizer).
        optimizer: AdamW and its schedule (paper: peak 3e-4 for 7B/13B, 1.5e-4 for 34B/70B, 2,000
            warm-up steps, cosine to 10%); the cosine spans ``trainer.max_steps`` unless ``decay_steps``.
        sharding: FSDP2 mixed precision when sharded (paper: bf16 compute), activation checkpointing.
    """

    def __init__(
        self,
        model: str | dict[str, Any] = "small",
        model_overrides: dict[str, Any] | None = None,
        init_from: str | None = None,
        optimizer: OptimizerArgs = DEFAULT_OPTIMIZER,
        sharding: ShardingArgs = ShardingArgs(),
    ) -> None:
        super().__init__()
        self.optimizer_args, self.sharding = save_grouped_hyperparameters(self, optimizer, DEFAULT_OPTIMIZER, sharding)
        self.config = build_config(model, model_overrides)
        self.model: Transformer | None = None
        self.flops_per_batch: int | None = None  # for LlamaThroughputMonitor's MFU, from the first batch
        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self._last_step_time: float | None = None

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is None:  # the sharding group's fields are the builder's keywords
            self.model = build_transformer(self.config, self.hparams.init_from, device_mesh=self.device_mesh,
                                           **vars(self.sharding))

    def forward(self, tokens: Tensor, sharded_logits: bool = False) -> Tensor:
        assert self.model is not None, "configure_model() has not run"
        return self.model(tokens, sharded_logits=sharded_logits)

    def _loss(self, batch: Any) -> tuple[Tensor, int]:
        x, y = unpack_lm_batch(batch)
        # (B, T, V); under tensor parallelism a DTensor of V/tp columns per rank, never gathered
        logits = self(x, sharded_logits=True)
        loss = cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
        if self.model is not None and self.flops_per_batch is None:
            self.flops_per_batch = self.model.flops_per_token(x.size(1)) * x.numel()
        return loss, int((y != IGNORE_INDEX).sum())

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, n_tokens = self._loss(batch)
        now = time.perf_counter()
        if self._last_step_time is not None:
            self.log("train/tokens_per_sec", n_tokens / (now - self._last_step_time), prog_bar=True,
                     on_step=True, on_epoch=False)
        self._last_step_time = now
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/ppl", torch.exp(loss.detach()), on_step=True, on_epoch=False)
        bpt = self._bytes_per_token()
        if bpt:
            self.log("train/bpb", loss.detach() / math.log(2) / bpt, on_step=True, on_epoch=False)
        return loss

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        with loss_backward_context(self.model):  # loss_parallel's backward, under tensor parallelism
            super().backward(loss, *args, **kwargs)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, n_tokens = self._loss(batch)
        self.val_loss.update(loss, weight=n_tokens)

    def on_validation_epoch_start(self) -> None:
        # A validate() before fit() leaves inference-mode state in the metric; start clean.
        self.val_loss.reset()

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/ppl", torch.exp(loss))
        bpt = self._bytes_per_token()
        if bpt:
            self.log("val/bpb", loss / math.log(2) / bpt, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("test/loss", loss)
        bpt = self._bytes_per_token()
        if bpt:
            self.log("test/bpb", loss / math.log(2) / bpt)

    def _bytes_per_token(self) -> float | None:
        """Bits per byte makes runs with different tokenizers comparable; the datamodule knows the ratio."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        value = getattr(dm, "bytes_per_token", None)
        return float(value) if value else None

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        assert self.model is not None
        return cosine_adamw(self, [(self.model, self.optimizer_args.lr)], self.optimizer_args)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain dict so `convert --from lightning` can rebuild the model with weights_only loading.
        checkpoint["llama_config"] = self.config.to_dict()
