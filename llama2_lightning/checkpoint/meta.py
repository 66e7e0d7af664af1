"""Meta's release format: ``params.json`` + ``consolidated.NN.pth`` model-parallel shards.

Meta's model-parallel layout (fairscale, one ``consolidated.NN.pth`` per rank; 13B has 2, 70B has 8):
``ColumnParallelLinear`` (wq, wk, wv, w1, w3, output) splits the output features, i.e. dim 0 of the
``(out, in)`` weight; ``RowParallelLinear`` (wo, w2) splits the input features, dim 1;
``ParallelEmbedding`` (tok_embeddings) splits the embedding dim, dim 1; the RMSNorm weights are
replicated on every rank.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from llama2_lightning.checkpoint.safe_load import safe_torch_load
from llama2_lightning.checkpoint.state_dict import (
    StateDict,
    check_state_dict,
    expected_shapes,
    fmt_shape,
    require_tensor_dict,
)
from llama2_lightning.config import LlamaConfig

# Meta's older exports include the RoPE table as `rope.freqs`; it is recomputed from the config, so it
# is dropped; anything else unknown is an error.
_META_NON_WEIGHTS = {"rope.freqs"}

# Dimension along which Meta's model-parallel ranks split each weight, keyed by the owning module's
# name (see the module docstring); modules not listed (the RMSNorms) are replicated.
_META_SPLIT_DIM = {
    "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,
    "wo": 1, "w2": 1, "tok_embeddings": 1,
}


def _meta_split_dim(name: str) -> int | None:
    parts = name.split(".")
    return _META_SPLIT_DIM.get(parts[-2]) if len(parts) >= 2 else None


def _meta_shard_paths(src: Path) -> list[Path]:
    numbered = []
    for path in src.glob("consolidated.*.pth"):
        match = re.fullmatch(r"consolidated\.(\d+)\.pth", path.name)
        if match:
            numbered.append((int(match.group(1)), path))
    numbered.sort()
    if not numbered:
        raise FileNotFoundError(f"{src}: no consolidated.NN.pth files beside params.json")
    ranks = [rank for rank, _ in numbered]
    if ranks != list(range(len(ranks))):
        raise ValueError(f"{src}: model-parallel shards must be numbered 00..{len(ranks) - 1:02d}, found {ranks}")
    return [path for _, path in numbered]


def _merge_meta_shards(shards: list[StateDict], paths: list[Path]) -> StateDict:
    if len(shards) == 1:
        return shards[0]
    names = list(shards[0])
    for shard, path in zip(shards[1:], paths[1:]):
        if set(shard) != set(names):
            diff = sorted(set(shard) ^ set(names))
            raise ValueError(f"{path}: holds different tensors than {paths[0].name}: {', '.join(diff)}")
    merged: StateDict = {}
    for name in names:
        parts = [shard[name] for shard in shards]
        shapes = {tuple(p.shape) for p in parts}
        if len(shapes) != 1:
            per_shard = ", ".join(f"{p.name} {fmt_shape(t.shape)}" for p, t in zip(paths, parts))
            raise ValueError(f"{name}: model-parallel shards disagree on its shape: {per_shard}")
        dim = _meta_split_dim(name)
        if dim is None:
            for path, part in zip(paths[1:], parts[1:]):
                if not torch.equal(part, parts[0]):
                    raise ValueError(
                        f"{name}: should be replicated across model-parallel shards but {path.name} "
                        f"differs from {paths[0].name}"
                    )
            merged[name] = parts[0]
        else:
            merged[name] = torch.cat(parts, dim=dim)
    return merged


def load_meta(src_dir: str | os.PathLike[str]) -> tuple[LlamaConfig, StateDict]:
    """Read Meta's release layout: ``params.json`` and ``consolidated.NN.pth`` model-parallel shards."""
    src = Path(src_dir)
    params_path = src / "params.json"
    if not params_path.is_file():
        raise FileNotFoundError(f"{src}: no params.json (not a Meta checkpoint directory)")
    paths = _meta_shard_paths(src)
    shards = []
    for path in paths:
        shard = require_tensor_dict(safe_torch_load(path), path, "a Meta shard")
        shards.append({k: v for k, v in shard.items() if k not in _META_NON_WEIGHTS})
    state_dict = _merge_meta_shards(shards, paths)
    # Llama 2's params.json says vocab_size: -1 (the tokenizer decides); the embedding knows.
    emb = state_dict.get("tok_embeddings.weight")
    config = LlamaConfig.from_meta_params(params_path, vocab_size=emb.shape[0] if emb is not None else None)
    # Meta's params.json cannot say "tied" (Llama 3.2 1B/3B are): a missing output projection, or
    # one equal to the embedding (save_meta writes such a copy), is the embedding itself.
    output = state_dict.get("output.weight")
    if emb is not None and (output is None or (output.shape == emb.shape and torch.equal(output, emb))):
        state_dict.pop("output.weight", None)
        config = LlamaConfig(**{**config.to_dict(), "tie_word_embeddings": True})
    check_state_dict(expected_shapes(config), state_dict, src)
    return config, state_dict


def _check_meta_divisible(config: LlamaConfig, num_shards: int) -> None:
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    # Each rank owns whole query and key/value heads, a slice of the FFN width and vocabulary, and a
    # slice of the embedding dim (ParallelEmbedding); each of those counts must split evenly.
    sizes = {
        "n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads, "hidden_dim": config.hidden_dim,
        "vocab_size": config.vocab_size, "dim": config.dim,
    }
    bad = [f"{k}={v}" for k, v in sizes.items() if v % num_shards != 0]
    if bad:
        raise ValueError(
            f"cannot split into {num_shards} model-parallel shards: {', '.join(bad)} not divisible by {num_shards}"
        )


def _with_meta_ffn_fields(config: LlamaConfig) -> LlamaConfig:
    """A config whose ``multiple_of``/``ffn_dim_multiplier`` derive its ``hidden_dim`` the way Meta's
    code does, so ``params.json`` needs no ``hidden_dim`` key (Meta's ``ModelArgs`` rejects it).
    Hugging Face configs carry only the width, so an imported 70B arrives with the defaults; the
    released Llama 2 settings are tried, and the width is kept explicit if none reproduces it."""
    candidates = [(config.multiple_of, config.ffn_dim_multiplier), (256, None), (4096, 1.3)]
    for multiple_of, multiplier in candidates:
        trial = LlamaConfig(**{**config.to_dict(), "multiple_of": multiple_of,
                               "ffn_dim_multiplier": multiplier, "hidden_dim": None})
        if trial.hidden_dim == config.hidden_dim:
            return trial
    return config


def save_meta(config: LlamaConfig, state_dict: Mapping[str, Tensor], dst_dir: str | os.PathLike[str],
              num_shards: int = 1) -> None:
    """Write ``params.json`` and ``num_shards`` ``consolidated.NN.pth`` files split as Meta's ranks hold them
    (a tied model's output projection as a copy of its embedding, which Meta's code expects)."""
    check_state_dict(expected_shapes(config), state_dict, "state dict to save")
    _check_meta_divisible(config, num_shards)
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    if config.tie_word_embeddings:
        # Meta's Transformer always has `output`; a copy of the embedding (load_meta ties it again).
        state_dict = {**state_dict, "output.weight": state_dict["tok_embeddings.weight"]}
    for rank in range(num_shards):
        shard: StateDict = {}
        for name, tensor in state_dict.items():
            dim = _meta_split_dim(name)
            part = tensor if dim is None else tensor.chunk(num_shards, dim=dim)[rank]
            # clone: a chunk is a view, and torch.save would write its whole parent storage.
            shard[name] = part.clone(memory_format=torch.contiguous_format)
        torch.save(shard, dst / f"consolidated.{rank:02d}.pth")
    params = _with_meta_ffn_fields(config).to_meta_params()
    (dst / "params.json").write_text(json.dumps(params, indent=2) + "\n")
