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
    # Per-head width; dim // n_heads unless given (some Llama-family models decouple them).
    head_dim: int | None = None
    # One tensor serves as the embedding and the output projection (SmolLM, Llama 3.2 1B/3B).
    tie_word_embeddings: bool = False
    # None, or Llama 3's frequency-dependent stretch of RoPE: {"rope_type": "llama3", "factor",
    # "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}.
    rope_scaling: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.n_heads > 0 and self.dim % self.n_heads != 0:
                raise ValueError(f"LlamaConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads}) "
                                 "unless head_dim is given")
            self.head_dim = self.dim // self.n_heads if self.n_heads > 0 else 0
        self.rope_scaling = check_rope_scaling(self.rope_scaling, "LlamaConfig.rope_scaling")
        for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len", "head_dim"):
            if getattr(self, key) <= 0:
                raise ValueError(f"LlamaConfig.{key} must be a positive integer, got {getattr(self, key)}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"LlamaConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}): "
                "each group of query heads shares one key/value head"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"LlamaConfig.head_dim ({self.head_dim}) must be even for RoPE")
        if self.hidden_dim is None:
            # Meta's FeedForward: 2/3 of 4*dim (SwiGLU keeps the FLOPs of a 4*dim MLP), optional
            # multiplier (34B/70B), rounded up to a multiple of `multiple_of`.
            hidden = int(2 * (4 * self.dim) / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def architecture(self) -> tuple:
        """The fields that decide the weights' shapes and the forward's numbers (``multiple_of`` and
        ``ffn_dim_multiplier`` only matter through ``hidden_dim``; ``max_seq_len`` only sizes tables)."""
        scaling = tuple(sorted(self.rope_scaling.items())) if self.rope_scaling else None
        return (self.dim, self.n_layers, self.n_heads, self.n_kv_heads, self.vocab_size, self.hidden_dim,
                self.norm_eps, self.rope_theta, self.head_dim, self.tie_word_embeddings, scaling)

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
        then ``vocab_size`` must be given or the paper's 32,000 is used. Llama 3.1+ files say
        ``use_scaled_rope: true`` (and 3.2 a ``rope_scaling_factor``): Meta's llama3 RoPE scaling."""
        path = Path(path)
        params = json.loads(path.read_text())
        use_scaled_rope = params.pop("use_scaled_rope", False)
        factor = params.pop("rope_scaling_factor", None)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - fields)
        if unknown:
            raise ValueError(f"{path}: unknown params.json keys {unknown}; expected a subset of "
                             f"{sorted(fields | {'use_scaled_rope', 'rope_scaling_factor'})}")
        if use_scaled_rope:
            # Meta's apply_scaling: a factor (8 unless given), low 1, high 4, over an 8,192 context.
            params["rope_scaling"] = {**META_LLAMA3_SCALING, "factor": float(factor or META_LLAMA3_SCALING["factor"])}
        elif factor is not None:
            raise ValueError(f"{path}: rope_scaling_factor={factor} without use_scaled_rope=true")
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
        if self.head_dim != self.dim // self.n_heads:
            params["head_dim"] = self.head_dim
        if self.rope_scaling is not None:
            fixed = {k: v for k, v in self.rope_scaling.items() if k != "factor"}
            if fixed != {k: v for k, v in META_LLAMA3_SCALING.items() if k != "factor"}:
                raise ValueError(f"rope_scaling={self.rope_scaling} has no params.json spelling: Meta's "
                                 f"use_scaled_rope fixes everything but the factor to {META_LLAMA3_SCALING}")
            params["use_scaled_rope"] = True
            params["rope_scaling_factor"] = self.rope_scaling["factor"]
        # tie_word_embeddings has no key either: Meta's files hold `output.weight` (save_meta writes a copy).
        return params

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf_config(cls, config: str | Path | dict[str, Any]) -> LlamaConfig:
        source = "Hugging Face config"
        if not isinstance(config, dict):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            source = str(path)
            config = json.loads(path.read_text())
        model_type = config.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"{source}: model_type={model_type!r}; only 'llama' is supported")
        # Keys whose non-default values this Llama cannot represent.
        for key, default in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu"),
                             ("pretraining_tp", 1)):
            if config.get(key, default) != default:
                raise ValueError(f"{source}: {key}={config[key]!r} is not supported (expected {default!r})")
        # transformers >= 5 nests rope_theta and the scaling in rope_parameters; older files use
        # top-level rope_theta and rope_scaling.
        rope = dict(config.get("rope_parameters") or {})
        key = "rope_parameters" if rope else "rope_scaling"
        if not rope:
            rope = dict(config.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope_type == "default":
            scaling = None
        elif rope_type == "llama3":
            scaling = {"rope_type": "llama3", **rope}
        else:
            raise ValueError(f"{source}: {key} has rope_type={rope_type!r}; supported: 'default', 'llama3'")
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
            head_dim=config.get("head_dim"),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            rope_scaling=check_rope_scaling(scaling, f"{source}: {key}"),
        )

    def to_hf_config(self) -> dict[str, Any]:
        rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope_parameters = {**self.rope_scaling, "rope_theta": self.rope_theta}
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
            # Both spellings: transformers < 5 reads these two, >= 5 reads rope_parameters.
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else dict(self.rope_scaling),
            "rope_parameters": rope_parameters,
            "max_position_embeddings": self.max_seq_len,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "float32",
        }


# Meta's llama3 scaling constants (llama-models' apply_scaling); params.json only sets the factor.
META_LLAMA3_SCALING: dict[str, Any] = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def check_rope_scaling(scaling: dict[str, Any] | None, source: str) -> dict[str, Any] | None:
    """``scaling`` as a plain dict with float/int values, or an error naming ``source`` and the bad key."""
    if scaling is None:
        return None
    scaling = dict(scaling)
    if scaling.get("rope_type") != "llama3":
        raise ValueError(f"{source}: rope_type={scaling.get('rope_type')!r} is not supported; expected 'llama3' "
                         "(or no scaling)")
    unknown = sorted(set(scaling) - {"rope_type", *_LLAMA3_KEYS})
    if unknown:
        raise ValueError(f"{source}: unsupported llama3 rope-scaling keys {unknown}; expected {list(_LLAMA3_KEYS)}")
    missing = [k for k in _LLAMA3_KEYS if k not in scaling]
    if missing:
        raise ValueError(f"{source}: llama3 rope scaling lacks {missing}")
    out: dict[str, Any] = {"rope_type": "llama3"}
    for k in _LLAMA3_KEYS:
        value = scaling[k]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{source}: {k}={value!r} must be a positive number")
        out[k] = int(value) if k == "original_max_position_embeddings" else float(value)
    if out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ValueError(f"{source}: high_freq_factor ({out['high_freq_factor']}) must exceed low_freq_factor "
                         f"({out['low_freq_factor']})")
    return out


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
