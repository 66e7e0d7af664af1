"""GGUF (llama.cpp's single-file format) import and export through the ``gguf`` package.

llama.cpp's converter stores a Llama's ``attn_q``/``attn_k`` rows in the order Meta's interleaved RoPE
uses (it undoes Hugging Face's half-split permutation on the way in), so GGUF and this package agree
on the row order and neither direction permutes; ``save_hf`` applies Hugging Face's order as usual.
Names map one to one (``token_embd`` = ``tok_embeddings``, ``blk.N.attn_q`` = ``layers.N.attention.wq``,
...). A file without ``output.weight`` ties the output projection to the embeddings, as llama.cpp does.

Quantised tensors are dequantised to float32 by ``gguf.quants.dequantize``; F16 and BF16 tensors keep
their dtype, so an unquantised file round-trips bit for bit.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import Tensor

from llama2_lightning.checkpoint.state_dict import StateDict, check_state_dict, expected_shapes, rename_key
from llama2_lightning.config import LlamaConfig
from llama2_lightning.model import llama3_scaled_frequencies
from llama2_lightning.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer
from llama2_lightning.tokenizer_files import hf_gguf_fields, sentencepiece_gguf_fields

# Writable tensor types: the unquantised ones round-trip exactly; Q8_0 is quantised by the package.
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0")

_TOP_LEVEL = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
              "output.weight": "output.weight"}
_LAYER = {
    "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
    "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
    "attention_norm": "attn_norm", "ffn_norm": "ffn_norm",
}
_GGUF_TOP_LEVEL = {v: k for k, v in _TOP_LEVEL.items()}
_GGUF_LAYER = {v: k for k, v in _LAYER.items()}
_OUR_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)\.weight")
_GGUF_LAYER_KEY = re.compile(r"blk\.(\d+)\.(.+)\.weight")


def gguf_to_ours_key(name: str) -> str:
    """Our name for a GGUF tensor; an unknown name comes back unchanged so the shape check reports it."""
    ours = rename_key(name, _GGUF_TOP_LEVEL, _GGUF_LAYER_KEY, _GGUF_LAYER, "layers.{}.{}.weight")
    return name if ours is None else ours


def ours_to_gguf_key(name: str) -> str:
    gguf_name = rename_key(name, _TOP_LEVEL, _OUR_LAYER_KEY, _LAYER, "blk.{}.{}.weight")
    if gguf_name is not None:
        return gguf_name
    raise KeyError(f"no GGUF name for parameter {name!r}")


# ---------------------------------------------------------------------------------------------- reading
def read_metadata(reader: Any) -> dict[str, Any]:
    """Every key-value field of an open ``GGUFReader`` as Python values (arrays as lists)."""
    return {name: field.contents() for name, field in reader.fields.items()}


def config_from_gguf_metadata(meta: Mapping[str, Any], tensor_names: set[str], source: str) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{source}: general.architecture={arch!r}; only 'llama' is supported")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise ValueError(f"{source}: metadata key llama.{key} is missing")
        return value

    for key in ("expert_count", "rope.scaling.type", "attention.key_length_mla"):
        value = meta.get(f"llama.{key}")
        if value not in (None, 0, "none"):
            raise ValueError(f"{source}: llama.{key}={value!r} is not supported by this Llama")
    dim, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(meta.get("llama.attention.key_length", meta.get("llama.rope.dimension_count", dim // n_heads)))
    vocab = meta.get("llama.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    if not vocab:
        raise ValueError(f"{source}: neither llama.vocab_size nor tokenizer.ggml.tokens gives the vocabulary size")
    return LlamaConfig(
        dim=dim,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        vocab_size=int(vocab),
        hidden_dim=int(get("feed_forward_length")),
        norm_eps=_float32_decimal(get("attention.layer_norm_rms_epsilon")),
        rope_theta=_float32_decimal(get("rope.freq_base", 10000.0)),
        max_seq_len=int(get("context_length", 4096)),
        head_dim=head_dim,
        tie_word_embeddings="output.weight" not in tensor_names,
    )


def _float32_decimal(value: float) -> float:
    """GGUF stores floats as float32: 1e-5 comes back as 9.99999974e-06. The shortest decimal that
    is the same float32 is what the writer was given (as written by a converter from a JSON config)."""
    return float(str(np.float32(value)))


def _tensor_from_gguf(tensor: Any) -> Tensor:
    """One reader tensor as torch, shaped (out, in) like nn.Linear's weight (GGUF lists dims reversed)."""
    kind = tensor.tensor_type
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF's ne order is innermost first
    data = np.asarray(tensor.data)
    if kind == gguf.GGMLQuantizationType.F32:
        out = torch.from_numpy(data.astype(np.float32, copy=True))
    elif kind == gguf.GGMLQuantizationType.F16:
        out = torch.from_numpy(data.astype(np.float16, copy=True))
    elif kind == gguf.GGMLQuantizationType.BF16:
        # The reader hands BF16 over as raw 16-bit words; reinterpret them bit for bit.
        out = torch.from_numpy(data.view(np.int16).copy()).view(torch.bfloat16)
    else:
        try:
            out = torch.from_numpy(gguf.quants.dequantize(data, kind))
        except NotImplementedError as err:
            raise ValueError(f"tensor {tensor.name}: the gguf package cannot dequantise type {kind.name}") from err
    return out.reshape(shape)


def read_gguf(path: str | os.PathLike[str]) -> tuple[LlamaConfig, StateDict, dict[str, Any]]:
    """Read a llama-architecture ``.gguf``: its config, every tensor dequantised, and its metadata
    (which holds the vocabulary: see ``tokenizer_files.tokenizer_json_from_gguf_fields``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    reader = gguf.GGUFReader(path)
    meta = read_metadata(reader)
    config = config_from_gguf_metadata(meta, {t.name for t in reader.tensors}, str(path))
    state_dict = {gguf_to_ours_key(t.name): _tensor_from_gguf(t) for t in reader.tensors}
    rope_factors = state_dict.pop(ROPE_FACTORS, None)
    if rope_factors is not None:
        scaling = llama3_scaling_from_factors(rope_factors, config, str(path))
        config = LlamaConfig(**{**config.to_dict(), "rope_scaling": scaling})
    check_state_dict(expected_shapes(config), state_dict, path)
    return config, state_dict, meta


def load_gguf(path: str | os.PathLike[str]) -> tuple[LlamaConfig, StateDict]:
    config, state_dict, _ = read_gguf(path)
    return config, state_dict


def read_gguf_config(path: str | os.PathLike[str]) -> LlamaConfig:
    reader = gguf.GGUFReader(path)
    config = config_from_gguf_metadata(read_metadata(reader), {t.name for t in reader.tensors}, str(path))
    factors = next((t for t in reader.tensors if t.name == ROPE_FACTORS), None)
    if factors is not None:
        scaling = llama3_scaling_from_factors(_tensor_from_gguf(factors), config, str(path))
        config = LlamaConfig(**{**config.to_dict(), "rope_scaling": scaling})
    return config


# ---------------------------------------------------------------------------------------------- llama3 RoPE
# llama.cpp keeps Llama 3's RoPE scaling as a tensor of per-frequency divisors (inv_freq / factor_i).
ROPE_FACTORS = "rope_freqs.weight"


def llama3_rope_factors(config: LlamaConfig) -> Tensor:
    """(head_dim / 2,) float32 divisors that turn plain RoPE frequencies into ``config``'s scaled ones."""
    plain = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim))
    return plain / llama3_scaled_frequencies(plain, config.rope_scaling)


def llama3_scaling_from_factors(factors: Tensor, config: LlamaConfig, source: str) -> dict[str, Any]:
    """The llama3 ``rope_scaling`` whose divisors are ``factors``. The band's edges are only fixed up
    to a common scale, so low_freq_factor is taken as Meta's 1; the result is checked to reproduce
    every divisor."""
    factors = factors.float().flatten()
    plain = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim))
    if factors.numel() != plain.numel():
        raise ValueError(f"{source}: {ROPE_FACTORS} has {factors.numel()} entries, expected head_dim/2 = {plain.numel()}")
    factor = float(factors.max())
    wavelength = 2 * math.pi / plain
    blend = (factors > 1 + 1e-6) & (factors < factor - 1e-6 * factor)
    if factor <= 1 or int(blend.sum()) < 2:
        raise ValueError(f"{source}: {ROPE_FACTORS} is not a llama3 scaling this loader can recover "
                         f"(max divisor {factor}, {int(blend.sum())} blended frequencies; need >= 2)")
    # In the band, 1/f = (1 - s)/factor + s with s = a / wavelength - b: a line in 1/wavelength.
    smooth = (1 / factors[blend] - 1 / factor) / (1 - 1 / factor)
    design = torch.stack([1 / wavelength[blend], -torch.ones_like(smooth)], dim=1).double()
    a, b = torch.linalg.lstsq(design, smooth.double().unsqueeze(1)).solution.flatten().tolist()
    low, high = 1.0, 1.0 + 1.0 / b
    # The divisors are float32: six significant digits are all they determine.
    scaling = {"rope_type": "llama3", "factor": float(f"{factor:.6g}"), "low_freq_factor": low,
               "high_freq_factor": float(f"{high:.6g}"),
               "original_max_position_embeddings": round(a / b)}
    rebuilt = plain / llama3_scaled_frequencies(plain, scaling)
    if not torch.allclose(rebuilt, factors, rtol=1e-4, atol=0):
        raise ValueError(f"{source}: {ROPE_FACTORS} does not follow llama3's scaling (recovered {scaling})")
    return scaling


# ---------------------------------------------------------------------------------------------- writing
def save_gguf(config: LlamaConfig, state_dict: Mapping[str, Tensor], dst: str | os.PathLike[str],
              tensor_type: str = "F16", tokenizer_metadata: Mapping[str, Any] | None = None,
              name: str | None = None) -> None:
    """Write one ``.gguf`` file that llama.cpp and transformers' GGUF loader read. ``tensor_type``
    (one of :data:`GGUF_TYPES`) applies to the matrices; norms stay F32 as llama.cpp keeps them.
    ``tokenizer_metadata`` are the ``tokenizer.*`` fields (see :func:`gguf_tokenizer_fields`)."""
    if tensor_type not in GGUF_TYPES:
        raise ValueError(f"tensor_type={tensor_type!r}; expected one of {GGUF_TYPES}")
    check_state_dict(expected_shapes(config), state_dict, "state dict to save")
    kind = gguf.GGMLQuantizationType[tensor_type]
    writer = gguf.GGUFWriter(str(dst), arch="llama")
    writer.add_name(name or "llama2-lightning export")
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    if config.head_dim != config.dim // config.n_heads:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_FILE_TYPES[tensor_type])
    for key, value in (tokenizer_metadata or {}).items():
        _add_field(writer, key, value)
    for our_name, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        matrix = tensor.dim() == 2
        if not matrix or kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(ours_to_gguf_key(our_name), tensor.float().numpy())
        elif kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(ours_to_gguf_key(our_name), tensor.to(torch.float16).numpy())
        elif kind == gguf.GGMLQuantizationType.BF16:
            words = tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            writer.add_tensor(ours_to_gguf_key(our_name), words, raw_shape=words.shape, raw_dtype=kind)
        else:
            blocks = gguf.quants.quantize(tensor.float().numpy(), kind)
            writer.add_tensor(ours_to_gguf_key(our_name), blocks, raw_dtype=kind)
    if config.rope_scaling is not None:
        writer.add_tensor(ROPE_FACTORS, llama3_rope_factors(config).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# llama_ftype: what the file's matrices mostly are (general.file_type).
_FILE_TYPES = {"F32": 0, "F16": 1, "Q8_0": 7, "BF16": 32}


def _add_field(writer: Any, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        raise TypeError(f"GGUF field {key}: cannot write a {type(value).__name__} (bool, int, float, str or lists)")


def gguf_tokenizer_fields(tokenizer: Tokenizer) -> dict[str, Any]:
    """The ``tokenizer.*`` fields that let llama.cpp (and transformers' GGUF loader) tokenise like ``tokenizer``."""
    if isinstance(tokenizer, HFTokenizer):
        return hf_gguf_fields(tokenizer.tokenizer_json, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id,
                              tokenizer.chat_template, tokenizer.add_bos)
    if isinstance(tokenizer, SentencePieceTokenizer):
        return sentencepiece_gguf_fields(tokenizer.model_bytes, tokenizer.chat_template)
    raise TypeError(f"no GGUF vocabulary for a {type(tokenizer).__name__}")
