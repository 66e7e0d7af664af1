"""LlamaConfig for Llama-family models beyond Llama 2: tied embeddings, rope_theta, Llama 3 RoPE
scaling, an explicit head_dim; from HF config.json, Meta params.json; unsupported keys name themselves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llama2_lightning.config import LlamaConfig
from llama2_lightning.model import Transformer, rope_frequencies

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
HF_BASE = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 256}


def test_hf_config_reads_tie_theta_scaling_and_head_dim() -> None:
    # transformers < 5 spelling
    c = LlamaConfig.from_hf_config({**HF_BASE, "tie_word_embeddings": True, "rope_theta": 500000.0,
                                    "rope_scaling": {**LLAMA3, "factor": 32}, "head_dim": 32})
    assert c.tie_word_embeddings and c.rope_theta == 500000.0 and c.head_dim == 32
    assert c.rope_scaling == {**LLAMA3, "factor": 32.0}
    # transformers >= 5 spelling: everything under rope_parameters
    c5 = LlamaConfig.from_hf_config({**HF_BASE, "rope_parameters": {"rope_theta": 500000.0, **LLAMA3}})
    assert c5.rope_theta == 500000.0 and c5.rope_scaling == LLAMA3
    plain = LlamaConfig.from_hf_config({**HF_BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    assert plain.rope_scaling is None and not plain.tie_word_embeddings
    assert LlamaConfig.from_hf_config(c.to_hf_config()) == LlamaConfig.from_hf_config(
        {**c.to_hf_config(), "rope_scaling": None})  # rope_parameters alone carries it


@pytest.mark.parametrize("extra, message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_scaling has rope_type='yarn'"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, r"rope_parameters has rope_type='linear'"),
    ({"rope_scaling": {**LLAMA3, "beta": 1.0}}, r"unsupported llama3 rope-scaling keys \['beta'\]"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"lacks \['low_freq_factor'"),
    ({"attention_bias": True}, r"attention_bias=True is not supported"),
    ({"mlp_bias": True}, r"mlp_bias=True is not supported"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported"),
    ({"model_type": "mistral"}, r"model_type='mistral'"),
])
def test_unsupported_hf_keys_name_themselves(extra: dict, message: str, tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**HF_BASE, **extra}))
    with pytest.raises(ValueError, match=message) as info:
        LlamaConfig.from_hf_config(path)
    assert str(path) in str(info.value)


def test_meta_params_use_scaled_rope(tmp_path: Path) -> None:
    # Llama 3.1 8B's params.json keys (use_scaled_rope: Meta's llama3 scaling with factor 8).
    params = {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32, "n_kv_heads": 8,
              "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 128256}
    (tmp_path / "params.json").write_text(json.dumps(params))
    c = LlamaConfig.from_meta_params(tmp_path / "params.json")
    assert c.rope_scaling == LLAMA3 and c.hidden_dim == 14336 and c.rope_theta == 500000.0
    out = c.to_meta_params()
    assert out["use_scaled_rope"] is True and out["rope_scaling_factor"] == 8.0
    (tmp_path / "params.json").write_text(json.dumps({**params, "rope_scaling_factor": 32}))  # Llama 3.2
    assert LlamaConfig.from_meta_params(tmp_path / "params.json").rope_scaling["factor"] == 32.0
    (tmp_path / "params.json").write_text(json.dumps({**params, "use_scaled_rope": False, "rope_scaling_factor": 32}))
    with pytest.raises(ValueError, match="rope_scaling_factor=32 without use_scaled_rope"):
        LlamaConfig.from_meta_params(tmp_path / "params.json")
    with pytest.raises(ValueError, match="no params.json spelling"):
        LlamaConfig(dim=64, n_heads=4, rope_scaling={**LLAMA3, "low_freq_factor": 2.0}).to_meta_params()


def test_config_dict_round_trip_and_architecture() -> None:
    c = LlamaConfig.from_name("tiny", tie_word_embeddings=True, rope_scaling=LLAMA3, head_dim=32)
    assert LlamaConfig.from_dict(c.to_dict()) == c
    assert c.architecture() != LlamaConfig.from_name("tiny").architecture()
    old = {k: v for k, v in LlamaConfig.from_name("tiny").to_dict().items()
           if k not in ("head_dim", "tie_word_embeddings", "rope_scaling")}
    assert LlamaConfig.from_dict(old).head_dim == 16  # checkpoints written before these keys existed
    with pytest.raises(ValueError, match="LlamaConfig.rope_scaling: rope_type='yarn'"):
        LlamaConfig.from_name("tiny", rope_scaling={"rope_type": "yarn"})
    with pytest.raises(ValueError, match="divisible by n_heads"):
        LlamaConfig(dim=66, n_heads=4)
    assert LlamaConfig(dim=66, n_heads=4, head_dim=16).head_dim == 16


def test_llama3_frequencies_follow_the_three_bands() -> None:
    plain = rope_frequencies(2, 128, 500000.0)[1].angle()  # position 1: the frequencies themselves
    scaled = rope_frequencies(2, 128, 500000.0, scaling=LLAMA3)[1].angle()
    wavelength = 2 * math.pi / plain
    short, long = wavelength < 8192 / 4, wavelength > 8192 / 1
    assert torch.equal(scaled[short], plain[short])
    torch.testing.assert_close(scaled[long], plain[long] / 8)
    mid = ~(short | long)
    assert mid.any() and ((scaled[mid] < plain[mid]) & (scaled[mid] > plain[mid] / 8)).all()


def test_tied_model_has_one_tensor() -> None:
    model = Transformer(LlamaConfig.from_name("tiny", tie_word_embeddings=True))
    assert "output.weight" not in model.state_dict()
    assert model.output.weight is model.tok_embeddings.weight
    x = torch.randint(0, 2048, (1, 5))
    torch.testing.assert_close(model(x), model.forward_hidden(x) @ model.tok_embeddings.weight.T)
    model(x).sum().backward()
    assert model.tok_embeddings.weight.grad is not None
    with torch.device("meta"):
        meta = Transformer(model.config)
    meta.to_empty(device="cpu")
    assert meta.output.weight is meta.tok_embeddings.weight  # no sharing to break: the output owns nothing
    untied = Transformer.from_name("tiny")
    assert untied.num_parameters() - model.num_parameters() == 2048 * 64
    assert untied.flops_per_token() == model.flops_per_token()  # the same matmuls
