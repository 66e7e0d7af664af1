"""Checkpoint import and export: Meta's release format, Hugging Face's Llama format, Lightning ``.ckpt``.

Every loader returns ``(LlamaConfig, state_dict)`` with this package's parameter names (which are
Meta's), checked against the shapes the config implies, so a conversion is ``load_*`` then
``save_*``. Loading never executes pickled code: ``.pth``/``.bin``/``.ckpt`` files are read with
``torch.load(weights_only=True)`` and Hugging Face weights preferably from safetensors.

Meta's model-parallel layout (fairscale, one ``consolidated.NN.pth`` per rank; 13B has 2, 70B has 8):
``ColumnParallelLinear`` (wq, wk, wv, w1, w3, output) splits the output features, i.e. dim 0 of the
``(out, in)`` weight; ``RowParallelLinear`` (wo, w2) splits the input features, dim 1;
``ParallelEmbedding`` (tok_embeddings) splits the embedding dim, dim 1; the RMSNorm weights are
replicated on every rank.

Hugging Face's Llama applies RoPE to the two halves of each head (dimension ``i`` pairs with
``i + head_dim/2``) while Meta rotates interleaved pairs ``(2i, 2i+1)``; the same model in HF's
format therefore has the rows of each head of ``wq``/``wk`` reordered: all first members of the
pairs, then all second members. The converters apply and undo that reordering.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from llama2_lightning.config import LlamaConfig
from llama2_lightning.model import Transformer

StateDict = dict[str, Tensor]

FORMATS = ("meta", "hf", "lightning")
EXPORT_FORMATS = ("meta", "hf")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Hugging Face's save_pretrained has long defaulted to "5GB" (decimal) shards.
DEFAULT_HF_SHARD_BYTES = 5_000_000_000

# Tensors some checkpoints carry that are not weights: Meta's older exports include the RoPE table
# as `rope.freqs`; transformers < 4.31 saved each layer's `rotary_emb.inv_freq` buffer. Both are
# recomputed from the config, so they are dropped; anything else unknown is an error.
_META_NON_WEIGHTS = {"rope.freqs"}
_HF_NON_WEIGHT = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

# Dimension along which Meta's model-parallel ranks split each weight, keyed by the owning module's
# name (see the module docstring); modules not listed (the RMSNorms) are replicated.
_META_SPLIT_DIM = {
    "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,
    "wo": 1, "w2": 1, "tok_embeddings": 1,
}

_HF_TOP_LEVEL = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_HF_LAYER = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_OURS_TOP_LEVEL = {ours: hf for hf, ours in _HF_TOP_LEVEL.items()}
_OURS_LAYER = {ours: hf for hf, ours in _HF_LAYER.items()}
_LAYER_KEY = re.compile(r"(model\.)?layers\.(\d+)\.(.+)\.weight")


# ---------------------------------------------------------------------------------------------- checks
def expected_shapes(config: LlamaConfig) -> dict[str, torch.Size]:
    """Parameter names and shapes of a ``Transformer(config)``, without allocating its weights."""
    with torch.device("meta"):
        model = Transformer(config)
    return {name: t.shape for name, t in model.state_dict().items()}


def _fmt_shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def check_state_dict(
    model_or_expected_shapes: nn.Module | Mapping[str, Sequence[int]],
    state_dict: Mapping[str, Tensor],
    source: str | os.PathLike[str],
) -> None:
    """Raise one ``ValueError`` naming ``source`` and listing every missing key, unexpected key and
    shape mismatch (``name: checkpoint (a, b) vs model (c, d)``), so a user sees the whole problem at
    once instead of the first of many ``load_state_dict`` complaints."""
    if isinstance(model_or_expected_shapes, nn.Module):
        expected = {k: tuple(v.shape) for k, v in model_or_expected_shapes.state_dict().items()}
    else:
        expected = {k: tuple(v) for k, v in model_or_expected_shapes.items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = sorted(k for k in state_dict if k not in expected)
    mismatched = [
        f"{k}: checkpoint {_fmt_shape(state_dict[k].shape)} vs model {_fmt_shape(expected[k])}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != expected[k]
    ]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{source}: checkpoint does not match the model"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
    if mismatched:
        lines.append(f"  shape mismatches ({len(mismatched)}):")
        lines.extend("    " + m for m in mismatched)
    raise ValueError("\n".join(lines))


def _safe_torch_load(path: Path) -> object:
    """``torch.load`` that only unpickles tensors and plain containers. mmap keeps a 70B shard from
    being read into memory twice; it needs the zip format every torch >= 1.6 writes."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        # torch's message is a page of advice; keep the line that says which global was refused.
        reason = next((ln.strip() for ln in str(err).splitlines() if "WeightsUnpickler error" in ln), str(err))
        raise pickle.UnpicklingError(
            f"{path}: refused to load: the file holds pickled objects other than tensors and plain "
            f"containers, and checkpoints are only loaded with weights_only=True. {reason}"
        ) from None


def _require_tensor_dict(obj: object, path: Path, what: str) -> StateDict:
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected {what} to be a mapping of names to tensors, got {type(obj).__name__}")
    return dict(obj)


# ---------------------------------------------------------------------------------------------- Meta
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
            per_shard = ", ".join(f"{p.name} {_fmt_shape(t.shape)}" for p, t in zip(paths, parts))
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
        shard = _require_tensor_dict(_safe_torch_load(path), path, "a Meta shard")
        shards.append({k: v for k, v in shard.items() if k not in _META_NON_WEIGHTS})
    state_dict = _merge_meta_shards(shards, paths)
    # Llama 2's params.json says vocab_size: -1 (the tokenizer decides); the embedding knows.
    emb = state_dict.get("tok_embeddings.weight")
    config = LlamaConfig.from_meta_params(params_path, vocab_size=emb.shape[0] if emb is not None else None)
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
    """Write ``params.json`` and ``num_shards`` ``consolidated.NN.pth`` files split as Meta's ranks hold them."""
    check_state_dict(expected_shapes(config), state_dict, "state dict to save")
    _check_meta_divisible(config, num_shards)
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
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


# ---------------------------------------------------------------------------------------------- Hugging Face
def _hf_to_ours_key(name: str) -> str:
    """Our name for a Hugging Face key; an unknown key is returned unchanged so the shape check
    reports it as unexpected under the name the user will find in their files."""
    if name in _HF_TOP_LEVEL:
        return _HF_TOP_LEVEL[name]
    match = _LAYER_KEY.fullmatch(name)
    if match and match.group(1) and match.group(3) in _HF_LAYER:
        return f"layers.{match.group(2)}.{_HF_LAYER[match.group(3)]}.weight"
    return name


def _ours_to_hf_key(name: str) -> str:
    if name in _OURS_TOP_LEVEL:
        return _OURS_TOP_LEVEL[name]
    match = _LAYER_KEY.fullmatch(name)
    if match and not match.group(1) and match.group(3) in _OURS_LAYER:
        return f"model.layers.{match.group(2)}.{_OURS_LAYER[match.group(3)]}.weight"
    raise KeyError(f"no Hugging Face name for parameter {name!r}")


def _rotary_meta_to_hf(weight: Tensor, n_heads: int) -> Tensor:
    out_features, in_features = weight.shape
    half = out_features // n_heads // 2
    # Meta rows of a head are pairs (2i, 2i+1); HF wants all first members, then all second members.
    w = weight.reshape(n_heads, half, 2, in_features)  # (heads, D/2, pair, C)
    return w.transpose(1, 2).reshape(out_features, in_features)  # (heads * [pair, D/2], C)


def _rotary_hf_to_meta(weight: Tensor, n_heads: int) -> Tensor:
    out_features, in_features = weight.shape
    half = out_features // n_heads // 2
    w = weight.reshape(n_heads, 2, half, in_features)  # (heads, pair, D/2, C)
    return w.transpose(1, 2).reshape(out_features, in_features)  # (heads * [D/2, pair], C)


def _rotary_heads(name: str, config: LlamaConfig) -> int | None:
    """How many heads' rows a weight holds if it feeds RoPE (wq: query heads, wk: KV heads)."""
    if name.endswith(".attention.wq.weight"):
        return config.n_heads
    if name.endswith(".attention.wk.weight"):
        return config.n_kv_heads
    return None


def _load_safetensors(path: Path) -> StateDict:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def _load_weight_file(path: Path) -> StateDict:
    if path.name.endswith(".safetensors"):
        return _load_safetensors(path)
    return _require_tensor_dict(_safe_torch_load(path), path, "a weights file")


def _read_hf_weights(src: Path) -> StateDict:
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (src / single).is_file():
            return _load_weight_file(src / single)
        if (src / index).is_file():
            weight_map: dict[str, str] = json.loads((src / index).read_text())["weight_map"]
            weights: StateDict = {}
            for file_name in sorted(set(weight_map.values())):
                shard = _load_weight_file(src / file_name)
                for name, tensor in shard.items():
                    if name in weights:
                        raise ValueError(f"{src / file_name}: tensor {name} also appears in another shard")
                    weights[name] = tensor
            absent = sorted(name for name in weight_map if name not in weights)
            if absent:
                raise ValueError(f"{src / index}: lists tensors its shards do not hold: {', '.join(absent)}")
            return weights
    raise FileNotFoundError(
        f"{src}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin or "
        "pytorch_model.bin.index.json"
    )


def load_hf(src_dir: str | os.PathLike[str]) -> tuple[LlamaConfig, StateDict]:
    """Read a Hugging Face ``LlamaForCausalLM`` directory (``config.json`` + safetensors or ``.bin``)."""
    src = Path(src_dir)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: no config.json (not a Hugging Face checkpoint directory)")
    config = LlamaConfig.from_hf_config(src / "config.json")
    state_dict = {
        _hf_to_ours_key(name): tensor
        for name, tensor in _read_hf_weights(src).items()
        if not _HF_NON_WEIGHT.fullmatch(name)
    }
    # Check before un-permuting: the reshape assumes the shapes the config implies.
    check_state_dict(expected_shapes(config), state_dict, src)
    for name, tensor in state_dict.items():
        heads = _rotary_heads(name, config)
        if heads is not None:
            state_dict[name] = _rotary_hf_to_meta(tensor, heads)
    return config, state_dict


def _dtype_name(state_dict: Mapping[str, Tensor]) -> str:
    floating = [t.dtype for t in state_dict.values() if t.is_floating_point()]
    return str(floating[0]).removeprefix("torch.") if floating else "float32"


def _write_safetensors(tensors: StateDict, dst: Path, max_shard_bytes: int) -> None:
    """``model.safetensors``, or numbered shards of at most ``max_shard_bytes`` plus Hugging Face's
    ``model.safetensors.index.json`` when the weights are larger."""
    shards: list[StateDict] = [{}]
    shard_bytes = 0
    for name, tensor in tensors.items():
        if shards[-1] and shard_bytes + tensor.nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += tensor.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(dst / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(dst / file_name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file_name))
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def save_hf(config: LlamaConfig, state_dict: Mapping[str, Tensor], dst_dir: str | os.PathLike[str],
            max_shard_bytes: int = DEFAULT_HF_SHARD_BYTES) -> None:
    """Write ``config.json``, ``generation_config.json`` and safetensors that ``LlamaForCausalLM``
    loads; weights beyond ``max_shard_bytes`` go to numbered shards with an index."""
    check_state_dict(expected_shapes(config), state_dict, "state dict to save")
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    tensors: StateDict = {}
    for name, tensor in state_dict.items():
        heads = _rotary_heads(name, config)
        if heads is not None:
            tensor = _rotary_meta_to_hf(tensor, heads)
        elif not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.nbytes:
            # safetensors refuses views and tensors sharing memory; give each its own storage.
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        tensors[_ours_to_hf_key(name)] = tensor

    _write_safetensors(tensors, dst, max_shard_bytes)

    hf_config = config.to_hf_config()
    hf_config["torch_dtype"] = _dtype_name(state_dict)
    (dst / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    generation = {"bos_token_id": hf_config["bos_token_id"], "eos_token_id": hf_config["eos_token_id"]}
    (dst / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- Lightning
def load_lightning(path: str | os.PathLike[str], prefix: str = "model.") -> tuple[LlamaConfig, StateDict]:
    """Read a ``.ckpt`` written by this package's LightningModules: the Transformer's weights are the
    ``state_dict`` entries under ``prefix`` and its config is the plain dict ``llama_config``.
    Entries under other prefixes (``ref_model.``, ``value_head.``...) belong to other submodules."""
    path = Path(path)
    if path.is_dir():
        ckpt = _consolidate_sharded(path)
    elif not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    else:
        ckpt = _safe_torch_load(path)
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path}: expected a Lightning checkpoint dict, got {type(ckpt).__name__}")
    for key in ("state_dict", "llama_config"):
        if key not in ckpt:
            raise ValueError(
                f"{path}: Lightning checkpoint has no {key!r} entry (keys: {sorted(ckpt)}); "
                "it was not written by a llama2-lightning module"
            )
    if not isinstance(ckpt["llama_config"], Mapping):
        raise ValueError(f"{path}: 'llama_config' should be a dict (LlamaConfig.to_dict()), "
                         f"got {type(ckpt['llama_config']).__name__}")
    config = LlamaConfig.from_dict(dict(ckpt["llama_config"]))
    full = _require_tensor_dict(ckpt["state_dict"], path, "'state_dict'")
    state_dict = {name[len(prefix):]: t for name, t in full.items() if name.startswith(prefix)}
    if not state_dict:
        prefixes = sorted({name.split(".", 1)[0] + "." for name in full})
        raise ValueError(f"{path}: no weights under prefix {prefix!r}; the state_dict has prefixes {prefixes}")
    check_state_dict(expected_shapes(config), state_dict, f"{path} (prefix {prefix!r})")
    return config, state_dict


def _consolidate_sharded(path: Path) -> dict[str, object]:
    """Gather a sharded checkpoint directory written by Lightning's ``ModelParallelStrategy``
    (``torch.distributed.checkpoint`` shards of ``state_dict`` + ``meta.pt`` with the rest) into one
    dict in this process, reading only the model weights (not the optimizer shards)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    if not (path / ".metadata").is_file() or not (path / "meta.pt").is_file():
        raise ValueError(
            f"{path} is a directory but not a sharded Lightning checkpoint (expected .metadata and meta.pt in it)"
        )
    ckpt = dict(_require_mapping(_safe_torch_load(path / "meta.pt"), path / "meta.pt"))
    loaded = _load_state_dict_from_keys({"state_dict"}, checkpoint_id=str(path))
    ckpt["state_dict"] = loaded["state_dict"]
    return ckpt


def _require_mapping(obj: object, path: Path) -> Mapping:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


# ---------------------------------------------------------------------------------------------- dispatch
def detect_format(path: str | os.PathLike[str]) -> str:
    """``"meta"`` for a directory with ``params.json``, ``"hf"`` for one with ``config.json``,
    ``"lightning"`` for a file (or a sharded Lightning checkpoint directory)."""
    path = Path(path)
    if path.is_file():
        return "lightning"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if (path / "params.json").is_file():
        return "meta"
    if (path / "config.json").is_file():
        return "hf"
    # torch.distributed.checkpoint (FSDP) writes `.metadata`; DeepSpeed names its folder `*.ckpt`.
    if path.suffix == ".ckpt" or (path / ".metadata").is_file():
        return "lightning"
    raise ValueError(
        f"{path}: cannot tell the checkpoint format: expected params.json (meta), config.json (hf) or a .ckpt file"
    )


def read_config(path: str | os.PathLike[str], fmt: str | None = None) -> LlamaConfig:
    """The model config stored with a checkpoint, without reading the weights where the format allows."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt == "hf":
        return LlamaConfig.from_hf_config(path)
    if fmt == "meta":
        params = json.loads((path / "params.json").read_text())
        if params.get("vocab_size", -1) > 0:
            return LlamaConfig.from_meta_params(path / "params.json")
        return load_meta(path)[0]  # the vocabulary size is only in the embedding's shape
    if fmt == "lightning":
        meta = _require_mapping(_safe_torch_load(path / "meta.pt" if path.is_dir() else path), path)
        if not isinstance(meta.get("llama_config"), Mapping):
            raise ValueError(f"{path}: Lightning checkpoint has no 'llama_config' dict")
        return LlamaConfig.from_dict(dict(meta["llama_config"]))
    raise ValueError(f"unknown checkpoint format {fmt!r}; expected 'meta', 'hf' or 'lightning'")


def load_checkpoint(path: str | os.PathLike[str], fmt: str | None = None) -> tuple[LlamaConfig, StateDict]:
    fmt = fmt or detect_format(path)
    if fmt == "meta":
        return load_meta(path)
    if fmt == "hf":
        return load_hf(path)
    if fmt == "lightning":
        return load_lightning(path)
    raise ValueError(f"unknown checkpoint format {fmt!r}; expected one of {FORMATS}")


def save_checkpoint(config: LlamaConfig, state_dict: Mapping[str, Tensor], dst: str | os.PathLike[str],
                    fmt: str, num_shards: int = 1) -> None:
    if fmt == "meta":
        save_meta(config, state_dict, dst, num_shards=num_shards)
    elif fmt == "hf":
        if num_shards != 1:
            raise ValueError("num_shards is Meta's model-parallel split; Hugging Face shards by size")
        save_hf(config, state_dict, dst)
    else:
        raise ValueError(f"cannot write checkpoint format {fmt!r}; expected one of {EXPORT_FORMATS}")


def load_model(path: str | os.PathLike[str], fmt: str | None = None, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> Transformer:
    """A ``Transformer`` holding a checkpoint's weights, without first allocating random ones."""
    config, state_dict = load_checkpoint(path, fmt)
    state_dict = {
        name: t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)
        for name, t in state_dict.items()
    }
    with torch.device("meta"):
        model = Transformer(config)
    check_state_dict(model, state_dict, path)
    model.load_state_dict(state_dict, strict=True, assign=True)
    # The RoPE table is a non-persistent buffer: `assign` leaves it on the meta device. Allocate it
    # beside the weights and let the model compute it.
    model.rope_table = torch.empty_like(model.rope_table, device=model.output.weight.device)
    model.reset_parameters()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{path}: tensors still on the meta device after loading: {left}")
    return model


# ---------------------------------------------------------------------------------------------- CLI
def _build_convert_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama2-lightning convert",
        description="Convert a Llama 2 checkpoint between Meta's, Hugging Face's and Lightning's formats.",
    )
    parser.add_argument("--from", dest="src_format", required=True, choices=FORMATS, help="format of SRC")
    parser.add_argument("--to", dest="dst_format", required=True, choices=EXPORT_FORMATS, help="format to write")
    parser.add_argument("src", metavar="SRC", type=Path, help="checkpoint directory (meta, hf) or .ckpt file")
    parser.add_argument("dst", metavar="DST", type=Path, help="directory to create")
    parser.add_argument("--num-shards", type=int, default=1,
                        help="Meta model-parallel shards to write (Llama 2 13B ships 2, 70B 8)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast floating-point weights (default: keep the source's dtype)")
    parser.add_argument("--prefix", default="model.",
                        help="with --from lightning: the state_dict prefix of the Transformer's weights")
    parser.add_argument("--force", action="store_true", help="replace a non-empty DST")
    return parser


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cli_convert(argv: list[str] | None = None) -> int:
    """``llama2-lightning convert``: returns the process exit status."""
    args = _build_convert_parser().parse_args(argv)
    src: Path = args.src
    dst: Path = args.dst
    prog = "llama2-lightning convert"
    if dst.exists() and not dst.is_dir():
        print(f"{prog}: error: {dst} exists and is not a directory", file=sys.stderr)
        return 1
    if dst.is_dir() and any(dst.iterdir()) and not args.force:
        print(f"{prog}: error: {dst} is not empty; pass --force to replace it", file=sys.stderr)
        return 1

    tmp: Path | None = None
    try:
        if args.src_format == "lightning":
            config, state_dict = load_lightning(src, prefix=args.prefix)
        else:
            config, state_dict = load_checkpoint(src, args.src_format)
        if args.dtype is not None:
            dtype = DTYPES[args.dtype]
            state_dict = {k: t.to(dtype) if t.is_floating_point() else t for k, t in state_dict.items()}

        # Write beside DST and rename, so an interrupted conversion never leaves a half-written DST.
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
        os.chmod(tmp, 0o777 & ~_current_umask())  # mkdtemp makes it private (0700)
        save_checkpoint(config, state_dict, tmp, args.dst_format, num_shards=args.num_shards)
        if src.is_dir() and (src / "tokenizer.model").is_file():
            shutil.copy2(src / "tokenizer.model", tmp / "tokenizer.model")

        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.rename(dst, old / dst.name)
            os.rename(tmp, dst)
            shutil.rmtree(old)
        else:
            os.rename(tmp, dst)
        tmp = None
    except (ValueError, KeyError, FileNotFoundError, NotImplementedError, pickle.UnpicklingError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    n_params = sum(t.numel() for t in state_dict.values())
    print(f"wrote {args.dst_format} checkpoint to {dst}: {n_params:,} parameters, {_dtype_name(state_dict)}")
    return 0



# ---------------------------------------------------------------------------------------------- reward models
def save_hf_sequence_classification(config: LlamaConfig, trunk_state_dict: Mapping[str, Tensor], score_weight: Tensor,
                                    dst_dir: str | os.PathLike[str], pad_token_id: int,
                                    max_shard_bytes: int = DEFAULT_HF_SHARD_BYTES) -> None:
    """Write a reward model (trunk + scalar head) as Hugging Face's ``LlamaForSequenceClassification``
    with one label: the trunk under ``model.*`` (HF names and rotary row order, as in :func:`save_hf`)
    and the head as ``score.weight`` (1, dim); no ``lm_head``.

    ``pad_token_id`` goes into ``config.json`` and must be an id the real tokens never use: HF reads
    each row's score at the last token that is not ``pad_token_id`` (so batches must be right-padded
    with it, or unpadded). Llama 2 has no pad piece; this package pads with ``<unk>`` (id 0).
    """
    expected = {k: v for k, v in expected_shapes(config).items() if k != "output.weight"}
    check_state_dict(expected, trunk_state_dict, "reward-model trunk to save")
    if tuple(score_weight.shape) != (1, config.dim):
        raise ValueError(f"score weight: shape {_fmt_shape(score_weight.shape)} vs expected (1, {config.dim})")
    if not 0 <= pad_token_id < config.vocab_size:
        raise ValueError(f"pad_token_id {pad_token_id} is outside the vocabulary [0, {config.vocab_size})")
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    tensors: StateDict = {}
    for name, tensor in trunk_state_dict.items():
        heads = _rotary_heads(name, config)
        tensor = _rotary_meta_to_hf(tensor, heads) if heads is not None else tensor
        # safetensors refuses views and tensors sharing memory; give each its own storage.
        tensors[_ours_to_hf_key(name)] = tensor.clone(memory_format=torch.contiguous_format)
    tensors["score.weight"] = score_weight.detach().clone(memory_format=torch.contiguous_format)

    _write_safetensors(tensors, dst, max_shard_bytes)

    hf_config = config.to_hf_config()
    hf_config.update({
        "architectures": ["LlamaForSequenceClassification"],
        "num_labels": 1,  # one scalar reward; HF derives id2label from it
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
        "pad_token_id": int(pad_token_id),
        "torch_dtype": _dtype_name(tensors),
    })
    (dst / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(cli_convert())
