"""Hugging Face's Llama format (``config.json`` + safetensors), for causal LMs and reward models.

Hugging Face's Llama applies RoPE to the two halves of each head (dimension ``i`` pairs with
``i + head_dim/2``) while Meta rotates interleaved pairs ``(2i, 2i+1)``; the same model in HF's
format therefore has the rows of each head of ``wq``/``wk`` reordered: all first members of the
pairs, then all second members. The converters apply and undo that reordering.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from llama2_lightning.checkpoint.safe_load import safe_torch_load
from llama2_lightning.checkpoint.state_dict import (
    StateDict, check_state_dict, expected_shapes, fmt_shape, rename_key, require_tensor_dict,
)
from llama2_lightning.config import LlamaConfig

# Hugging Face's save_pretrained has long defaulted to "5GB" (decimal) shards.
DEFAULT_HF_SHARD_BYTES = 5_000_000_000

# transformers < 4.31 saved each layer's `rotary_emb.inv_freq` buffer; it is recomputed from the
# config, so it is dropped; anything else unknown is an error.
HF_NON_WEIGHT = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

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
_HF_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
_OURS_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)\.weight")



def hf_to_ours_key(name: str) -> str:
    """Our name for a Hugging Face key; an unknown key is returned unchanged so the shape check
    reports it as unexpected under the name the user will find in their files."""
    ours = rename_key(name, _HF_TOP_LEVEL, _HF_LAYER_KEY, _HF_LAYER, "layers.{}.{}.weight")
    return name if ours is None else ours


def ours_to_hf_key(name: str) -> str:
    hf = rename_key(name, _OURS_TOP_LEVEL, _OURS_LAYER_KEY, _OURS_LAYER, "model.layers.{}.{}.weight")
    if hf is None:
        raise KeyError(f"no Hugging Face name for parameter {name!r}")
    return hf


def rotary_meta_to_hf(weight: Tensor, n_heads: int) -> Tensor:
    out_features, in_features = weight.shape
    half = out_features // n_heads // 2
    # Meta rows of a head are pairs (2i, 2i+1); HF wants all first members, then all second members.
    w = weight.reshape(n_heads, half, 2, in_features)  # (heads, D/2, pair, C)
    return w.transpose(1, 2).reshape(out_features, in_features)  # (heads * [pair, D/2], C)


def rotary_hf_to_meta(weight: Tensor, n_heads: int) -> Tensor:
    out_features, in_features = weight.shape
    half = out_features // n_heads // 2
    w = weight.reshape(n_heads, 2, half, in_features)  # (heads, pair, D/2, C)
    return w.transpose(1, 2).reshape(out_features, in_features)  # (heads * [D/2, pair], C)


def rotary_heads(name: str, config: LlamaConfig) -> int | None:
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
    return require_tensor_dict(safe_torch_load(path), path, "a weights file")


def read_hf_weights(src: Path) -> StateDict:
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
        hf_to_ours_key(name): tensor
        for name, tensor in read_hf_weights(src).items()
        if not HF_NON_WEIGHT.fullmatch(name)
    }
    # Check before un-permuting: the reshape assumes the shapes the config implies.
    if config.tie_word_embeddings:
        # Tied files usually omit lm_head; one that stores it stores the embedding again.
        state_dict.pop("output.weight", None)
    check_state_dict(expected_shapes(config), state_dict, src)
    for name, tensor in state_dict.items():
        heads = rotary_heads(name, config)
        if heads is not None:
            state_dict[name] = rotary_hf_to_meta(tensor, heads)
    return config, state_dict


def dtype_name(state_dict: Mapping[str, Tensor]) -> str:
    floating = [t.dtype for t in state_dict.values() if t.is_floating_point()]
    return str(floating[0]).removeprefix("torch.") if floating else "float32"


def write_safetensors(tensors: StateDict, dst: Path, max_shard_bytes: int) -> None:
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
        heads = rotary_heads(name, config)
        if heads is not None:
            tensor = rotary_meta_to_hf(tensor, heads)
        elif not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.nbytes:
            # safetensors refuses views and tensors sharing memory; give each its own storage.
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        tensors[ours_to_hf_key(name)] = tensor

    write_safetensors(tensors, dst, max_shard_bytes)

    hf_config = config.to_hf_config()
    hf_config["torch_dtype"] = dtype_name(state_dict)
    (dst / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    generation = {"bos_token_id": hf_config["bos_token_id"], "eos_token_id": hf_config["eos_token_id"]}
    (dst / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


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
        raise ValueError(f"score weight: shape {fmt_shape(score_weight.shape)} vs expected (1, {config.dim})")
    if not 0 <= pad_token_id < config.vocab_size:
        raise ValueError(f"pad_token_id {pad_token_id} is outside the vocabulary [0, {config.vocab_size})")
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    tensors: StateDict = {}
    for name, tensor in trunk_state_dict.items():
        heads = rotary_heads(name, config)
        tensor = rotary_meta_to_hf(tensor, heads) if heads is not None else tensor
        # safetensors refuses views and tensors sharing memory; give each its own storage.
        tensors[ours_to_hf_key(name)] = tensor.clone(memory_format=torch.contiguous_format)
    tensors["score.weight"] = score_weight.detach().clone(memory_format=torch.contiguous_format)

    write_safetensors(tensors, dst, max_shard_bytes)

    hf_config = config.to_hf_config()
    hf_config.update({
        "architectures": ["LlamaForSequenceClassification"],
        "num_labels": 1,  # one scalar reward; HF derives id2label from it
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
        "pad_token_id": int(pad_token_id),
        "torch_dtype": dtype_name(tensors),
    })
    (dst / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")

