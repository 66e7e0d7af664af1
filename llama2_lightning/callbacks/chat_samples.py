"""Log the model's answers to fixed user prompts during SFT (a wandb Table when the logger is wandb)."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

from llama2_lightning.chat import Message, encode_prompt
from llama2_lightning.distributed import is_sharded
from llama2_lightning.generation import generate


class ChatSamples(L.Callback):
    """Every ``every_n_steps`` training steps (and at the end of training), answer each prompt as a
    one-turn Llama 2-Chat dialog (``[INST] prompt [/INST]``, with ``system`` folded in when given).

    Needs ``trainer.datamodule.tokenizer`` and ``pl_module.model`` (a Transformer). Every rank runs the
    generation (sharded weights need all ranks for their all-gathers); rank 0 prints and logs. The
    accumulated table is part of the callback's state, so a resumed run keeps the earlier rows.
    """

    def __init__(self, prompts: list[str] | None = None, system: str | None = None, every_n_steps: int = 200,
                 max_new_tokens: int = 64, temperature: float = 0.7, top_p: float = 0.9, seed: int = 0,
                 print_samples: bool = True) -> None:
        self.prompts = prompts or ["Give three tips for staying healthy.", "What is the capital of France?"]
        self.system = system
        self.every_n_steps = every_n_steps
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.print_samples = print_samples
        self.history: list[tuple[int, str, str]] = []  # (step, prompt, answer)
        self._warned = False

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
        if is_sharded(model):
            # generate() itself runs on FSDP2 models (the sharded PPO test covers it), but sampling chats
            # from a sharded SFT run is not tested yet: skip rather than risk the training run.
            if not self._warned:
                rank_zero_warn("ChatSamples: sampling from an FSDP2-sharded model is not supported yet; skipped")
                self._warned = True
            return []
        dialogs: list[list[Message]] = [
            ([{"role": "system", "content": self.system}] if self.system else []) + [{"role": "user", "content": p}]
            for p in self.prompts
        ]
        prompts = [encode_prompt(tokenizer, d) for d in dialogs]
        max_new = min(self.max_new_tokens, model.config.max_seq_len - max(len(p) for p in prompts))
        if max_new < 1:
            raise ValueError(f"ChatSamples: a prompt of {max(len(p) for p in prompts)} tokens leaves no room "
                             f"in the model's max_seq_len={model.config.max_seq_len}")
        out = generate(model, prompts, max_new, temperature=self.temperature, top_p=self.top_p,
                       eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, seed=self.seed)
        answers = [tokenizer.decode([t for t in row if t != tokenizer.eos_id]).strip() for row in out.as_lists()]
        step = trainer.global_step
        self.history.extend((step, p, a) for p, a in zip(self.prompts, answers))
        if trainer.is_global_zero:
            if self.print_samples:
                for p, a in zip(self.prompts, answers):
                    print(f"[step {step}] {p!r} -> {a!r}")
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    # wandb tables are immutable once logged: each call logs the whole history so far.
                    logger.log_table("chat_samples", columns=["step", "prompt", "answer"],
                                     data=[list(row) for row in self.history])
        return answers

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(row) for row in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [tuple(row) for row in state_dict.get("history", [])]
