"""Meta's model-parallel shards read lazily, block by block, for a sharded model (no merge).

:func:`llama2_lightning.checkpoint.meta.load_meta` concatenates the ``consolidated.NN.pth`` parts of
every weight, which holds the whole model in memory (70B: 138 GB) on every rank that calls it. A
sharded model needs only its own block of each weight: :class:`MetaWeight` stands for the whole
tensor (its ``shape``), and indexing it with a block reads just the parts of the shards that overlap
that block along Meta's split dimension, each file memory-mapped on first use (:class:`MetaShards`).

When the tensor-parallel plan splits a weight where Meta did (``wq wk wv w1 w3 output`` on dim 0,
``wo w2`` on dim 1: ``ColwiseParallel``/``RowwiseParallel`` over a TP group as large as the number of
shards), TP rank i's block lies inside ``consolidated.0i.pth``, so it opens that file only; FSDP2's
slice of it is a sub-block of the same part. The embedding is the exception: Meta split
``tok_embeddings`` on the embedding dim (``ParallelEmbedding``), the plan splits it on the vocabulary,
so each rank reads its vocabulary rows from every shard (rows x dim/N from each, through mmap: that
one tensor, and only those pages). Replicated weights (the RMSNorms) come from the rank's own shard.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import Tensor

from llama2_lightning.checkpoint.meta import _META_NON_WEIGHTS, _meta_shard_paths, _meta_split_dim
from llama2_lightning.checkpoint.safe_load import safe_torch_load
from llama2_lightning.checkpoint.state_dict import StateDict, fmt_shape, require_tensor_dict
from llama2_lightning.config import LlamaConfig


class MetaShards:
    """The ``consolidated.NN.pth`` files of one Meta checkpoint directory, each loaded (memory-mapped)
    the first time one of its tensors is read."""

    def __init__(self, src_dir: str | os.PathLike[str]) -> None:
        self.src = Path(src_dir)
        self.paths = _meta_shard_paths(self.src)
        self._loaded: dict[int, StateDict] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def names(self, shard: int) -> list[str]:
        return [k for k in self._load(shard) if k not in _META_NON_WEIGHTS]

    def tensor(self, shard: int, name: str) -> Tensor:
        """``name``'s part in shard ``shard`` (memory-mapped: slicing it reads only those pages)."""
        part = self._load(shard).get(name)
        if part is None:
            raise ValueError(f"{self.paths[shard]}: no tensor {name} (the other shards have it)")
        return part

    def _load(self, shard: int) -> StateDict:
        if shard not in self._loaded:
            path = self.paths[shard]
            self._loaded[shard] = require_tensor_dict(safe_torch_load(path), path, "a Meta shard")
        return self._loaded[shard]


class MetaWeight:
    """One weight of a Meta checkpoint as the whole tensor, without reading it: ``shape`` and ``dtype``
    are the whole tensor's, and ``weight[block]`` (a tuple of slices) returns that block, read from the
    shards that hold part of it (``preferred``: the shard a replicated weight is read from)."""

    def __init__(self, shards: MetaShards, name: str, preferred: int = 0) -> None:
        self.shards, self.name, self.preferred = shards, name, preferred
        self.dim = _meta_split_dim(name)
        part = shards.tensor(preferred, name)
        shape = list(part.shape)
        if self.dim is not None:
            shape[self.dim] *= len(shards)
        self.part_shape, self.shape, self.dtype = tuple(part.shape), torch.Size(shape), part.dtype

    def __getitem__(self, block: tuple[slice, ...]) -> Tensor:
        block = tuple(block) + (slice(None),) * (len(self.shape) - len(tuple(block)))
        if self.dim is None:
            return self.shards.tensor(self.preferred, self.name)[block]
        n = self.part_shape[self.dim]  # rows (or columns) per shard
        start, stop, _ = block[self.dim].indices(self.shape[self.dim])
        if stop <= start:  # an empty block (FSDP2's padding rank): no shard overlaps it
            return self.shards.tensor(self.preferred, self.name)[block[: self.dim] + (slice(0, 0),)]
        pieces = []
        for j in range(start // n, math.ceil(stop / n)):  # only the shards that overlap the block
            part = self.shards.tensor(j, self.name)
            if tuple(part.shape) != self.part_shape:
                raise ValueError(f"{self.name}: model-parallel shards disagree on its shape: "
                                 f"{self.shards.paths[j].name} {fmt_shape(part.shape)}, "
                                 f"{self.shards.paths[self.preferred].name} {fmt_shape(self.part_shape)}")
            inner = list(block)
            inner[self.dim] = slice(max(start, j * n) - j * n, min(stop, (j + 1) * n) - j * n)
            pieces.append(part[tuple(inner)])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=self.dim)


def meta_weights(shards: MetaShards, preferred: int = 0) -> dict[str, MetaWeight]:
    """Every weight of ``shards`` as a :class:`MetaWeight` (names from the ``preferred`` shard, which
    is the only file this opens)."""
    return {name: MetaWeight(shards, name, preferred) for name in shards.names(preferred)}


def read_meta_config(src_dir: str | os.PathLike[str]) -> LlamaConfig:
    """The config of a Meta directory without merging its shards: Llama 2's ``params.json`` says
    ``vocab_size: -1``, so the vocabulary comes from the embedding's rows in shard 0 (not split: Meta
    splits the embedding on dim 1). Tied when there is no ``output`` weight, or when it is a copy of
    the embedding (``save_meta`` writes one), judged on the block both hold in shard 0: the first
    V / N vocabulary rows and C / N columns, 1/N^2 of the tensor read through the memory map (an untied
    head does not repeat that much of the embedding exactly)."""
    shards = MetaShards(src_dir)
    emb = shards.tensor(0, "tok_embeddings.weight")  # (V, C / N)
    params = json.loads((shards.src / "params.json").read_text())
    config = LlamaConfig.from_meta_params(shards.src / "params.json",
                                          vocab_size=None if params.get("vocab_size", -1) > 0 else emb.shape[0])
    names = shards.names(0)
    if "output.weight" in names:
        out = shards.tensor(0, "output.weight")  # (V / N, C)
        rows, cols = out.shape[0], emb.shape[1]  # the block of the whole tensors that shard 0 holds of both
        tied = out.shape[1] == emb.shape[1] * len(shards) and torch.equal(out[:rows, :cols], emb[:rows, :cols])
    else:
        tied = True
    return LlamaConfig(**{**config.to_dict(), "tie_word_embeddings": True}) if tied else config
