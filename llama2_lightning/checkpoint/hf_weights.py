"""A Hugging Face safetensors checkpoint read block by block into a sharded model (issue 15).

``load_hf`` reads every tensor whole, which a rank of a sharded 70B run cannot afford (~138 GB in
bf16 per rank). Here each weight is an :class:`HFWeight`: ``shape`` and ``dtype`` come from the file
header, and ``weight[block]`` reads only that block through safetensors' ``get_slice`` (the file is
memory-mapped), so ``shard_loading.materialize`` copies each rank's FSDP2 / tensor-parallel slice
without ever holding the whole model. A rank's host memory grows with its shard.

``wq`` / ``wk`` need Hugging Face's rotary permutation undone (``hf.rotary_hf_to_meta``). It only
reorders rows within each head, so a block of Meta rows is read as the whole heads that contain it,
un-permuted, and cut to the block: at most two heads' rows more than the block itself.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from llama2_lightning.checkpoint.hf import HF_NON_WEIGHT, hf_to_ours_key, rotary_hf_to_meta, rotary_heads
from llama2_lightning.checkpoint.state_dict import check_state_dict, expected_shapes
from llama2_lightning.config import LlamaConfig

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class HFWeight:
    """One weight of a safetensors file as the whole tensor in Meta's layout, without reading it."""

    def __init__(self, path: Path, hf_name: str, heads: int | None) -> None:
        self.path, self.hf_name, self.heads = path, hf_name, heads
        with safe_open(str(path), framework="pt", device="cpu") as f:
            piece = f.get_slice(hf_name)
            self.shape = torch.Size(piece.get_shape())
            dtype = piece.get_dtype()
        if dtype not in _DTYPES:
            raise ValueError(f"{path}: tensor {hf_name} has dtype {dtype}; expected one of {', '.join(_DTYPES)}")
        self.dtype = _DTYPES[dtype]

    def _read(self, block: tuple[slice, ...]) -> Tensor:
        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            return f.get_slice(self.hf_name)[block]

    def __getitem__(self, block: tuple[slice, ...]) -> Tensor:
        block = tuple(block) + (slice(None),) * (len(self.shape) - len(tuple(block)))
        if self.heads is None:
            return self._read(block)
        rows_per_head = self.shape[0] // self.heads
        start, stop, _ = block[0].indices(self.shape[0])
        if stop <= start:  # an empty block (FSDP2's padding rank)
            return self._read((slice(0, 0), *block[1:]))
        h0, h1 = start // rows_per_head, math.ceil(stop / rows_per_head)  # the heads holding the rows
        heads = self._read((slice(h0 * rows_per_head, h1 * rows_per_head), *block[1:]))  # (rows, C')
        meta = rotary_hf_to_meta(heads, h1 - h0)  # the permutation stays inside each head
        return meta[start - h0 * rows_per_head: stop - h0 * rows_per_head]


def _weight_files(src: Path) -> dict[str, Path] | None:
    """Tensor name -> safetensors file of a Hugging Face directory; ``None`` if it holds ``.bin`` files."""
    if (src / "model.safetensors").is_file():
        with safe_open(str(src / "model.safetensors"), framework="pt", device="cpu") as f:
            return {name: src / "model.safetensors" for name in f.keys()}
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return {name: src / file for name, file in weight_map.items()}
    return None


def hf_weights(src_dir: str | os.PathLike[str]) -> dict[str, HFWeight] | None:
    """Every weight of a Hugging Face safetensors directory as an :class:`HFWeight` under its Meta
    name, checked against the config's shapes (errors name the directory); ``None`` for a ``.bin``
    directory (read whole with ``load_hf``, memory-mapped)."""
    src = Path(src_dir)
    config = LlamaConfig.from_hf_config(src / "config.json")
    files = _weight_files(src)
    if files is None:
        return None
    weights = {}
    for hf_name, path in files.items():
        if HF_NON_WEIGHT.fullmatch(hf_name):
            continue
        name = hf_to_ours_key(hf_name)
        weights[name] = HFWeight(path, hf_name, rotary_heads(name, config))
    if config.tie_word_embeddings:
        weights.pop("output.weight", None)  # a tied file that stores lm_head stores the embedding again
    check_state_dict(expected_shapes(config), weights, src)  # type: ignore[arg-type]
    return weights


__all__ = ["HFWeight", "hf_weights"]
