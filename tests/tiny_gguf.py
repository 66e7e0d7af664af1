"""A tiny random Llama in a GGUF file with its own byte-level BPE vocabulary and ChatML template: the shape
of SmolLM2-135M-Instruct's file (tied embeddings, tokenizer.json-style vocabulary, `chat_template`) without
its weights, so the real-model pipeline runs in CI."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers

from llama2_lightning.checkpoint.gguf import gguf_tokenizer_fields, save_gguf
from llama2_lightning.config import LlamaConfig
from llama2_lightning.model import Transformer
from llama2_lightning.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0-2, as in SmolLM2


def _corpus() -> list[str]:
    """Text like what the pipeline reads (HH dialogs, self-instruct tasks), so sequences stay short."""
    lines = []
    for name in ("hh_helpful_pairs.jsonl.gz", "hh_harmless_pairs.jsonl.gz"):
        with gzip.open(ROOT / "data" / "preference" / name, "rt", encoding="utf-8") as f:
            lines += [json.loads(line)["chosen"] for _, line in zip(range(300), f)]
    with (ROOT / "data" / "sft" / "self_instruct_seed_tasks.jsonl").open(encoding="utf-8") as f:
        lines += [line for line in f]
    return lines


def write_tiny_gguf(dst: Path, vocab_size: int = 1024, seed: int = 0) -> Path:
    """``dst`` (a .gguf): a 2-block, 32-wide random model with tied embeddings and a BPE vocabulary."""
    work = dst.parent / (dst.stem + "-tokenizer")
    work.mkdir(parents=True, exist_ok=True)
    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.save(str(work / "tokenizer.json"))
    (work / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "chat_template": CHATML}))
    tok = Tokenizer(work / "tokenizer.json")
    config = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, multiple_of=16,
                         max_seq_len=2048, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():  # small tied embeddings: near-uniform next-token logits, so answers are varied text
        model.tok_embeddings.weight.normal_(0.0, 0.02)  # (a unit-scale tied embedding predicts its own input)
    save_gguf(config, model.state_dict(), dst, tensor_type="F32", tokenizer_metadata=gguf_tokenizer_fields(tok))
    return dst
