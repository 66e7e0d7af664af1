"""Log generations for fixed prompts during training (a wandb Table when the logger is wandb).

``SampleCallback`` owns when and how: every ``every_n_steps`` optimiser steps and at the end of
training, every rank samples (a sharded model's weights are gathered once for the whole generation,
as in RLHF rollouts), rank 0 prints and logs, and the table so far is part of the callback's state,
so a resumed run keeps its earlier rows. Subclasses say what the prompts are:
``GenerationSamples`` continues raw text (pretraining), ``ChatSamples`` answers one-turn chats (SFT).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from llama2_lightning.distributed import gathered
from llama2_lightning.generation import generate
from llama2_lightning.tokenizer import Tokenizer


class SampleCallback(L.Callback):
    """Sample ``max_new_tokens`` after each of ``prompts`` every ``every_n_steps`` steps (module docstring).

    Needs ``trainer.datamodule.tokenizer`` and ``pl_module.model`` (a Transformer).
    """

    table = "samples"
    columns = ("step", "prompt", "completion")

    def __init__(self, prompts: list[str], every_n_steps: int, max_new_tokens: int, temperature: float,
                 top_p: float, seed: int = 0, print_samples: bool = True) -> None:
        self.prompts = prompts
        self.every_n_steps = every_n_steps
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.print_samples = print_samples
        self.history: list[tuple[int, str, str]] = []  # (step, prompt, text)

    def encode(self, tokenizer: Tokenizer) -> list[list[int]]:
        """Token ids of every prompt."""
        raise NotImplementedError

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step == 0 or step % self.every_n_steps != 0:
            return
        self.log_samples(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_steps > 0:
            self.log_samples(trainer, pl_module)

    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[str]:
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        model = getattr(pl_module, "model", None)
        if tokenizer is None or model is None:
            return []
        prompts = self.encode(tokenizer)
        max_new = min(self.max_new_tokens, model.config.max_seq_len - max(len(p) for p in prompts))
        if max_new < 1:
            raise ValueError(f"{type(self).__name__}: a prompt of {max(len(p) for p in prompts)} tokens leaves no "
                             f"room in the model's max_seq_len={model.config.max_seq_len}")
        with gathered(model):  # generate() itself switches to eval mode and back
            out = generate(model, prompts, max_new, temperature=self.temperature, top_p=self.top_p,
                           eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, seed=self.seed)
        texts = [tokenizer.decode([t for t in row if t != tokenizer.eos_id]).strip() for row in out.as_lists()]
        step = trainer.global_step
        self.history.extend((step, p, t) for p, t in zip(self.prompts, texts))
        if trainer.is_global_zero:
            if self.print_samples:
                for p, t in zip(self.prompts, texts):
                    print(f"[step {step}] {p!r} -> {t!r}")
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    # wandb tables are immutable once logged: each call logs the whole history so far.
                    logger.log_table(self.table, columns=list(self.columns), data=[list(r) for r in self.history])
        return texts

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(row) for row in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [tuple(row) for row in state_dict.get("history", [])]


class GenerationSamples(SampleCallback):
    """Continue raw-text prompts (pretraining). A packed pretraining stream separates documents by EOS
    alone, so each prompt follows an EOS, as a fresh document would."""

    def __init__(self, prompts: list[str] | None = None, every_n_steps: int = 500, max_new_tokens: int = 48,
                 temperature: float = 0.8, top_p: float = 0.95, seed: int = 0, print_samples: bool = True) -> None:
        super().__init__(prompts or ["ROMEO:", "First Citizen:\n"], every_n_steps, max_new_tokens, temperature,
                         top_p, seed, print_samples)

    def encode(self, tokenizer: Tokenizer) -> list[list[int]]:
        return [[tokenizer.eos_id, *tokenizer.encode(p)] for p in self.prompts]


__all__ = ["SampleCallback", "GenerationSamples"]
