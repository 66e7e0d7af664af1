"""Model configuration with Meta's field names and the paper's presets.

The fields are exactly those of Meta's ``ModelArgs`` / ``params.json`` so a Meta checkpoint's
``params.json`` loads directly; ``hidden_dim`` (the SwiGLU width) is derived in ``__post_init__``
the way Meta's ``FeedForward`` derives it, unless given explicitly (Hugging Face configs carry it
as ``intermediate_size``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class LlamaConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    hidden_dim: int | None = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise ValueError(f"LlamaConfig.{key} must be a positive integer, got {getattr(self, key)}")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"LlamaConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"LlamaConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}): "
                "each group of query heads shares one key/value head"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"LlamaConfig head_dim = dim / n_heads = {self.head_dim} must be even for RoPE")
        if self.hidden_dim is None:
            # Meta's FeedForward: 2/3 of 4*dim (SwiGLU keeps the FLOPs of a 4*dim MLP), optional
            # multiplier (34B/70B), rounded up to a multiple of `multiple_of`.
            hidden = int(2 * (4 * self.dim) / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def architecture(self) -> tuple:
        """The fields that decide the weights' shapes and the forward's numbers (``multiple_of`` and
        ``ffn_dim_multiplier`` only matter through ``hidden_dim``; ``max_seq_len`` only sizes tables)."""
        return (self.dim, self.n_layers, self.n_heads, self.n_kv_heads, self.vocab_size, self.hidden_dim,
                self.norm_eps, self.rope_theta)

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> LlamaConfig:
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LlamaConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"Unknown LlamaConfig keys {unknown}; expected a subset of {sorted(fields)}")
        return cls(**data)

    # ------------------------------------------------------------------ Meta params.json
    @classmethod
    def from_meta_params(cls, path: str | Path, vocab_size: int | None = None) -> LlamaConfig:
        """Read Meta's ``params.json``. Llama 2 files say ``vocab_size: -1`` (the tokenizer decides);
        then ``vocab_size`` must be given or the paper's 32,000 is used."""
        path = Path(path)
        params = json.loads(path.read_text())
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - fields)
        if unknown:
            raise ValueError(f"{path}: unknown params.json keys {unknown}; expected a subset of {sorted(fields)}")
        if params.get("vocab_size", -1) <= 0:
            params["vocab_size"] = vocab_size if vocab_size is not None else 32000
        return cls(**params)

    def to_meta_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size,
            "multiple_of": self.multiple_of,
            "ffn_dim_multiplier": self.ffn_dim_multiplier,
            "norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "max_seq_len": self.max_seq_len,
        }
        # Meta's params.json has no explicit FFN width: keep it only when the derivation disagrees.
        derived = dataclasses.replace(self, hidden_dim=None).hidden_dim
        if derived != self.hidden_dim:
            params["hidden_dim"] = self.hidden_dim
        return params

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf_config(cls, config: str | Path | dict[str, Any]) -> LlamaConfig:
        if not isinstance(config, dict):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            config = json.loads(path.read_text())
        model_type = config.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"Hugging Face config has model_type={model_type!r}; only 'llama' is supported")
        if config.get("rope_scaling"):
            raise ValueError(f"Hugging Face config has rope_scaling={config['rope_scaling']!r}; Llama 2 uses none")
        if config.get("tie_word_embeddings", False):
            raise ValueError("Hugging Face config has tie_word_embeddings=true; Llama 2 keeps `output` separate")
        head_dim = config.get("head_dim")
        if head_dim is not None and head_dim * config["num_attention_heads"] != config["hidden_size"]:
            raise ValueError(
                f"Hugging Face config has head_dim={head_dim} but hidden_size / num_attention_heads = "
                f"{config['hidden_size'] // config['num_attention_heads']}; Llama 2 ties them"
            )
        rope_theta = config.get("rope_theta")
        if rope_theta is None:  # transformers >= 5 nests it in rope_parameters
            rope_theta = (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            n_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            vocab_size=config["vocab_size"],
            norm_eps=config.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta),
            max_seq_len=config.get("max_position_embeddings", 4096),
            hidden_dim=config["intermediate_size"],
        )

    def to_hf_config(self) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_seq_len,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "rope_scaling": None,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "float32",
        }


# Paper numbers (Touvron et al. 2023, Table 1 / Meta's released params.json; 34B as Code Llama 34B).
PRESETS: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32),
    "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40),
    "llama2-34b": dict(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.0),
    "llama2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096),
    # CPU presets. `tiny` has GQA (4 query heads share 2 KV heads) and the shipped tokenizer's vocabulary.
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=2048, multiple_of=32, max_seq_len=256),
    "tiny-mha": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=2048, multiple_of=32, max_seq_len=256),
    "tiny-mqa": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=2048, multiple_of=32, max_seq_len=256),
    # ~6M parameters: the default pretraining model on 2 CPU cores.
    "small": dict(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, vocab_size=2048, multiple_of=64, max_seq_len=512),
    # ~100M parameters with GQA: the benchmark configuration.
    "llama-100m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, vocab_size=32000, multiple_of=256,
                       max_seq_len=2048),
}
