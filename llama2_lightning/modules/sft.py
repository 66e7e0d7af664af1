"""Supervised fine-tuning: next-token loss on answer tokens only (paper section 3.1).

Batches come from :class:`llama2_lightning.data.sft.SFTDataModule`: ``input_ids`` and ``labels``
(B, T), the label -100 everywhere except on answer tokens and their EOS, and for packed rows
``position_ids`` and ``segment_ids`` so that each dialog restarts its RoPE positions and attends only
to itself. The loss averages over the answer tokens of the batch, so a packed row and the same
dialogs padded one per row give the same number.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import MeanMetric

from llama2_lightning.data.sft import packed_attention_mask
from llama2_lightning.losses import answer_loss
from llama2_lightning.model import Transformer
from llama2_lightning.modules.args import FinetuneArgs, OptimizerArgs, ShardingArgs
from llama2_lightning.modules.common import build_config, build_transformer, cosine_adamw, save_grouped_hyperparameters
from llama2_lightning.modules.finetune import apply_finetune, finetune_group, merge_adapters, restore_adapters

DEFAULT_OPTIMIZER = OptimizerArgs(lr=2e-5, warmup_steps=10, min_lr_ratio=0.1)  # paper, section 3.1
from llama2_lightning.tensor_parallel import loss_backward_context


class SFTModule(L.LightningModule):
    """Fine-tune a pretrained Llama 2 on dialogs, the loss on answer tokens only (Llama 2-Chat SFT).

    Args:
        init_from: the pretrained weights: a Lightning ``.ckpt`` written by this package, or a Hugging
            Face or Meta directory. ``None`` starts from random weights (only sensible for tests).
        model: preset name or ``LlamaConfig`` dict; ``None`` takes the config stored with ``init_from``.
            A given preset is checked against the checkpoint's shapes when the weights load.
        model_overrides: fields to change on that config (e.g. ``max_seq_len``).
        optimizer: AdamW and its schedule (paper: peak 2e-5, weight decay 0.1, cosine). The paper states
            no warm-up for SFT; the default 10 steps is a short ramp for the first updates (a paper-sized
            run, 27,540 dialogs x 2 epochs at batch 64, is at most ~860 optimiser steps). The paper's
            cosine has no stated floor; 0.1 is its pretraining schedule's. The cosine spans
            ``trainer.max_steps``, else the run's length, unless ``decay_steps``.
        sharding: FSDP2 mixed precision when sharded (bf16 compute on GPUs), activation checkpointing.
        finetune: which weights train: all (default, the paper), LoRA adapters (``lora_rank``) or the top
            ``trainable_blocks``; checkpoints keep Meta's layout either way (``modules/finetune.py``).
    """

    def __init__(
        self,
        init_from: str | None = None,
        model: str | dict[str, Any] | None = None,
        model_overrides: dict[str, Any] | None = None,
        optimizer: OptimizerArgs = DEFAULT_OPTIMIZER,
        sharding: ShardingArgs = ShardingArgs(),
        finetune: FinetuneArgs = FinetuneArgs(),
    ) -> None:
        super().__init__()
        self.optimizer_args, self.sharding = save_grouped_hyperparameters(self, optimizer, DEFAULT_OPTIMIZER, sharding)
        if model is None and init_from is None:
            raise ValueError("SFTModule: set init_from (the pretrained checkpoint) or model (a preset, random weights)")
        try:
            self.config = build_config(model, model_overrides, init_from)
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"SFTModule: init_from={init_from!r} not found ({err}); train the base model first (e.g. "
                "`llama2-lightning fit --config configs/pretrain/tiny.yaml`) or pass --model.init_args.init_from PATH"
            ) from None
        self.finetune = finetune_group(self, "finetune", finetune, self.config)
        if init_from is None:
            rank_zero_warn("SFTModule: init_from is None, so fine-tuning starts from random weights")
        self.model: Transformer | None = None
        self.flops_per_batch: int | None = None  # for LlamaThroughputMonitor's MFU, from the first batch
        self.val_loss = MeanMetric()
        self.val_acc = MeanMetric()

    # ------------------------------------------------------------------ model
    def setup(self, stage: str) -> None:
        # Fail before any weights are built if the data cannot fit the model.
        dm = self.trainer.datamodule if self._trainer is not None else None
        seq = getattr(dm, "max_seq_len", None)
        if seq is not None and seq > self.config.max_seq_len:
            raise ValueError(
                f"data max_seq_len={seq} exceeds the model's max_seq_len={self.config.max_seq_len}: lower "
                "--data.init_args.max_seq_len or raise --model.init_args.model_overrides.max_seq_len"
            )
        vocab = getattr(dm, "vocab_size", None)
        if vocab is not None and vocab > self.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {vocab} pieces but the model's vocab_size is {self.config.vocab_size}: "
                "use the tokenizer the base model was pretrained with"
            )

    def configure_model(self) -> None:
        if self.model is None:  # the sharding group's fields are the builder's keywords
            self.model = build_transformer(self.config, self.hparams.init_from, device_mesh=self.device_mesh,
                                           **vars(self.sharding))
            apply_finetune(self.model, self.finetune, "finetune", self.device_mesh)

    def forward(self, tokens: Tensor, positions: Tensor | None = None, mask: Tensor | None = None,
                sharded_logits: bool = False) -> Tensor:
        assert self.model is not None, "configure_model() has not run"
        return self.model(tokens, positions=positions, mask=mask, sharded_logits=sharded_logits)

    def _loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        x, y = batch["input_ids"], batch["labels"]  # (B, T)
        positions = mask = None
        if "segment_ids" in batch:
            # Packed rows: every dialog restarts at position 0 and sees only its own tokens, so it is
            # scored exactly as it would be alone in a padded row.
            positions, mask = batch["position_ids"], packed_attention_mask(batch["segment_ids"])  # (B, T), (B, 1, T, T)
        # (B, T, V); under tensor parallelism a DTensor of V/tp columns per rank, never gathered
        logits = self(x, positions=positions, mask=mask, sharded_logits=True)
        if self.model is not None and self.flops_per_batch is None:
            self.flops_per_batch = self.model.flops_per_token(x.size(1)) * x.numel()
        return answer_loss(logits, y)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, n, correct = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/acc", correct / n.clamp(min=1), on_step=True, on_epoch=False)
        self.log("train/answer_tokens", n.float(), on_step=True, on_epoch=False)
        return loss

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        with loss_backward_context(self.model):  # loss_parallel's backward, under tensor parallelism
            super().backward(loss, *args, **kwargs)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, n, correct = self._loss(batch)
        # Weighted by answer tokens: the epoch value is the mean over every held-out answer token,
        # however the tokens fall into batches (or packed rows).
        self.val_loss.update(loss, weight=n)
        self.val_acc.update(correct / n.clamp(min=1), weight=n)

    def on_validation_epoch_start(self) -> None:
        # Fresh states made in this loop's grad mode: after `trainer.validate` (inference mode) the old
        # ones are inference tensors, which fit's validation (no_grad) cannot update in place.
        self.val_loss.reset()
        self.val_acc.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, split: str) -> None:
        # compute() already reduces across ranks; sync_dist then only averages equal numbers (and keeps
        # Lightning from warning about epoch-level values that look unsynced).
        loss, acc = self.val_loss.compute(), self.val_acc.compute()
        self.val_loss.reset()
        self.val_acc.reset()
        self.log(f"{split}/loss", loss, prog_bar=True, sync_dist=True)
        self.log(f"{split}/acc", acc, sync_dist=True)
        self.log(f"{split}/ppl", torch.exp(loss), sync_dist=True)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        assert self.model is not None
        return cosine_adamw(self, [(self.model, self.optimizer_args.lr)], self.optimizer_args)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain dict so `convert --from lightning`, `chat` and a later stage's init_from can rebuild the
        # model with weights_only loading.
        checkpoint["llama_config"] = self.config.to_dict()
        merge_adapters(self, checkpoint)  # LoRA: merged weights under Meta names, adapters beside them

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_adapters(self, checkpoint)  # a resumed LoRA run: the adapters and frozen weights back
