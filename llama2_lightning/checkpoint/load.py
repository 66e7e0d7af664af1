"""Any supported format in or out: detect it, read its config, load or save its weights."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llama2_lightning.checkpoint.gguf import load_gguf, read_gguf_config, save_gguf
from llama2_lightning.checkpoint.hf import load_hf, save_hf
from llama2_lightning.checkpoint.lightning import load_lightning, read_checkpoint_state, save_lightning
from llama2_lightning.checkpoint.meta import load_meta, save_meta
from llama2_lightning.checkpoint.meta_shards import read_meta_config
from llama2_lightning.checkpoint.state_dict import StateDict, check_state_dict
from llama2_lightning.config import LlamaConfig
from llama2_lightning.model import Transformer

FORMATS = ("meta", "hf", "lightning", "gguf")
EXPORT_FORMATS = ("meta", "hf", "lightning", "gguf")


def detect_format(path: str | os.PathLike[str]) -> str:
    """``"meta"`` for a directory with ``params.json``, ``"hf"`` for one with ``config.json``,
    ``"gguf"`` for a file starting with GGUF's magic bytes, ``"lightning"`` for another file (or a
    sharded Lightning checkpoint directory)."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as handle:
            return "gguf" if handle.read(4) == b"GGUF" else "lightning"
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
        # params.json cannot say "tied" (nor, in Llama 2's, the vocabulary size): shard 0 tells both
        return read_meta_config(path)
    if fmt == "lightning":
        meta = read_checkpoint_state(path)  # a .ckpt, or a sharded directory's meta.pt (no tensors read)
        if not isinstance(meta.get("llama_config"), Mapping):
            raise ValueError(f"{path}: Lightning checkpoint has no 'llama_config' dict")
        return LlamaConfig.from_dict(dict(meta["llama_config"]))
    if fmt == "gguf":
        return read_gguf_config(path)
    raise ValueError(f"unknown checkpoint format {fmt!r}; expected one of {FORMATS}")


def load_checkpoint(path: str | os.PathLike[str], fmt: str | None = None) -> tuple[LlamaConfig, StateDict]:
    fmt = fmt or detect_format(path)
    if fmt == "meta":
        return load_meta(path)
    if fmt == "hf":
        return load_hf(path)
    if fmt == "lightning":
        return load_lightning(path)
    if fmt == "gguf":
        return load_gguf(path)
    raise ValueError(f"unknown checkpoint format {fmt!r}; expected one of {FORMATS}")


def save_checkpoint(config: LlamaConfig, state_dict: Mapping[str, Tensor], dst: str | os.PathLike[str],
                    fmt: str, num_shards: int = 1, gguf_type: str = "F16",
                    gguf_tokenizer: Mapping[str, Any] | None = None) -> None:
    """Write ``fmt``: a directory for meta and hf, a file for lightning (``.ckpt``) and gguf (whose
    matrices are ``gguf_type`` and whose vocabulary is ``gguf_tokenizer``, ``tokenizer.*`` fields)."""
    if num_shards != 1 and fmt != "meta":
        raise ValueError(f"num_shards is Meta's model-parallel split; {fmt} does not shard that way")
    if fmt == "meta":
        save_meta(config, state_dict, dst, num_shards=num_shards)
    elif fmt == "hf":
        save_hf(config, state_dict, dst)
    elif fmt == "lightning":
        save_lightning(config, state_dict, dst)
    elif fmt == "gguf":
        save_gguf(config, state_dict, dst, tensor_type=gguf_type, tokenizer_metadata=gguf_tokenizer)
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
    model.rope_table = torch.empty_like(model.rope_table, device=model.tok_embeddings.weight.device)
    model.reset_parameters()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{path}: tensors still on the meta device after loading: {left}")
    return model
