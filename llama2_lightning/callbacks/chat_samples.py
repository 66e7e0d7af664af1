"""Log the model's answers to fixed user prompts during SFT (a wandb Table when the logger is wandb)."""

from __future__ import annotations

from llama2_lightning.callbacks.samples import SampleCallback
from llama2_lightning.chat import Message, encode_prompt
from llama2_lightning.tokenizer import Tokenizer


class ChatSamples(SampleCallback):
    """Every ``every_n_steps`` training steps (and at the end of training), answer each prompt as a
    one-turn Llama 2-Chat dialog (``[INST] prompt [/INST]``, with ``system`` folded in when given).
    Scheduling, sharded models, logging and state: ``SampleCallback``."""

    table = "chat_samples"
    columns = ("step", "prompt", "answer")

    def __init__(self, prompts: list[str] | None = None, system: str | None = None, every_n_steps: int = 200,
                 max_new_tokens: int = 64, temperature: float = 0.7, top_p: float = 0.9, seed: int = 0,
                 print_samples: bool = True) -> None:
        super().__init__(prompts or ["Give three tips for staying healthy.", "What is the capital of France?"],
                         every_n_steps, max_new_tokens, temperature, top_p, seed, print_samples)
        self.system = system

    def encode(self, tokenizer: Tokenizer) -> list[list[int]]:
        dialogs: list[list[Message]] = [
            ([{"role": "system", "content": self.system}] if self.system else []) + [{"role": "user", "content": p}]
            for p in self.prompts
        ]
        return [encode_prompt(tokenizer, d) for d in dialogs]


__all__ = ["ChatSamples"]
