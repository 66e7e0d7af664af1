"""Log generations for fixed prompts every N steps (a wandb Table when the logger is wandb)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from llama2_lightning.generation import generate


class GenerationSamples(L.Callback):
    """Every ``every_n_steps`` training steps, sample ``max_new_tokens`` after each prompt.

    Needs ``trainer.datamodule.tokenizer`` and ``pl_module.model`` (a Transformer). Every rank runs the
    generation (sharded weights need all ranks for their all-gathers); rank 0 logs it.
    """

    def __init__(self, prompts: list[str] | None = None, every_n_steps: int = 500, max_new_tokens: int = 48,
                 temperature: float = 0.8, top_p: float = 0.95, seed: int = 0, print_samples: bool = True) -> None:
        self.prompts = prompts or ["ROMEO:", "First Citizen:\n"]
        self.every_n_steps = every_n_steps
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.print_samples = print_samples
        self.history: list[tuple[int, str, str]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
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
        # Packed pretraining streams separate documents by EOS alone, so a fresh document follows EOS.
        prompts = [[tokenizer.eos_id, *tokenizer.encode(p)] for p in self.prompts]
        max_new = min(self.max_new_tokens, model.config.max_seq_len - max(len(p) for p in prompts))
        out = generate(model, prompts, max_new,
                       temperature=self.temperature, top_p=self.top_p, eos_id=tokenizer.eos_id,
                       pad_id=tokenizer.pad_id, seed=self.seed)
        texts = [tokenizer.decode([t for t in row if t != tokenizer.eos_id]) for row in out.as_lists()]
        step = trainer.global_step
        self.history.extend((step, p, t) for p, t in zip(self.prompts, texts))
        if trainer.is_global_zero:
            if self.print_samples:
                for p, t in zip(self.prompts, texts):
                    print(f"[step {step}] {p!r} -> {t!r}")
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_table("samples", columns=["step", "prompt", "completion"],
                                     data=[list(row) for row in self.history])
        return texts
