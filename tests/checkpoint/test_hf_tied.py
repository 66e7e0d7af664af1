"""Hugging Face Llama variants real checkpoints use (tied embeddings, Llama 3 RoPE scaling, an explicit
head_dim): imported with transformers' logits and exported back loading with no missing or unexpected keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig as HFConfig
from transformers import LlamaForCausalLM

from llama2_lightning.checkpoint import load_hf, load_model, save_hf

BASE = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


@pytest.mark.parametrize("extra", [dict(tie_word_embeddings=True, rope_theta=100000.0),
                                   dict(rope_scaling=LLAMA3, rope_theta=500000.0),
                                   dict(head_dim=16, tie_word_embeddings=True)], ids=["tied","llama3","head_dim"])
def test_hf_roundtrip(tmp_path: Path, extra: dict) -> None:
    torch.manual_seed(0)
    hf = LlamaForCausalLM(HFConfig(**BASE, **extra)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf").eval()
    tokens = torch.randint(0, 96, (2, 200))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-4, rtol=0)
    config, sd = load_hf(tmp_path / "hf")
    save_hf(config, sd, tmp_path / "back")
    back, info = LlamaForCausalLM.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, hf(tokens).logits, atol=1e-5, rtol=0)
