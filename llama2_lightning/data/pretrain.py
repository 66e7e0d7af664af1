"""Pretraining data: text files -> one packed, memory-mapped token stream -> fixed-length windows.

Pipeline
    1. ``prepare_data`` (once per node) tokenises every document, appends EOS after each one and
       writes the ids to ``<cache_dir>/<key>.bin`` (uint16 when the vocabulary fits, else uint32)
       plus a ``<key>.json`` sidecar. ``key`` hashes the inputs' *contents* (not their paths), the
       tokenizer model's contents and ``FORMAT_VERSION``, so a second run reuses the file and any
       edited input or tokenizer tokenises afresh.
    2. ``setup`` memory-maps the stream read-only and cuts it into windows of ``max_seq_len + 1``
       tokens with stride ``max_seq_len``: window ``i`` is ``stream[i*L : i*L + L + 1]``. Windows
       share one boundary token, so every token after the first is a prediction target exactly
       once; only a tail shorter than ``max_seq_len`` targets is dropped. A seeded permutation
       sends whole windows to validation.
    3. Training order is a seeded permutation per epoch (``seed + epoch``), strided across ranks
       (disjoint, equal length, remainder dropped). The sampler runs in the main process, so
       dataloader workers only fetch the indices they are handed and cannot duplicate data.
    4. Resume: batch ``g`` of a run is batch ``g % batches_per_epoch`` of epoch
       ``g // batches_per_epoch``, and each pass of the sampler starts at ``g`` = the training
       batches Lightning has finished (its loop counter, restored from any checkpoint), so a resumed
       run continues with the next unseen batch. ``state_dict`` guards that the stream is unchanged.

Input formats
    * plain UTF-8 text (any extension): the whole file is one document;
    * ``.jsonl``: one document per line, its ``text`` field; blank lines are skipped;
    * either one gzipped (``.txt.gz``, ``.jsonl.gz``).

Samples are dicts ``{"input_ids": x, "targets": y}`` of ``torch.long`` tensors of shape
``(max_seq_len,)``, with ``y[t]`` the token that follows ``x[t]`` (already shifted, no padding,
no ignore index). No BOS is inserted: EOS alone separates documents, so a document's first token is
predicted from the previous document's EOS.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterator, Sized
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from llama2_lightning.data.base import TokenizedDataModule, check_ints
from llama2_lightning.data.token_cache import (  # noqa: F401  (re-exported: callers and tests import them from here)
    _ENCODE_BATCH,
    FORMAT_VERSION,
    _is_jsonl,
    _iter_jsonl,
    _open_bytes,
    _read_cache,
    _write_json_atomic,
    build_token_file,
    cache_key,
    file_digest,
    iter_documents,
    resolve_files,
    token_dtype,
)

# Start of the warning Lightning gives on a mid-epoch resume when the DataLoader has no state_dict.
_NOT_RESUMABLE_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"


class PackedWindows(Dataset):
    """Windows ``stream[w*L : w*L + L + 1]`` for the window numbers ``w`` in ``windows``."""

    def __init__(self, path: Path, dtype: str, num_tokens: int, max_seq_len: int, windows: np.ndarray) -> None:
        self.path = Path(path)
        self.dtype = dtype
        self.num_tokens = num_tokens
        self.max_seq_len = max_seq_len
        self.windows = np.asarray(windows, dtype=np.int64)
        self._tokens: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self._tokens is None:
            # Opened lazily, per process: each dataloader worker maps the file itself instead of
            # receiving a pickled copy of the data.
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        start = int(self.windows[index]) * self.max_seq_len
        chunk = torch.from_numpy(self._tokens[start : start + self.max_seq_len + 1].astype(np.int64))
        return {"input_ids": chunk[:-1], "targets": chunk[1:]}  # (max_seq_len,) each

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None}


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (seeded shuffle per epoch, strided rank slices, remainder dropped) that
    can start an epoch part-way through.

    It subclasses ``DistributedSampler`` because under DDP Lightning replaces any other sampler by a
    ``DistributedSamplerWrapper``, which would shard our already-sharded indices a second time.
    ``__len__`` stays the full per-rank epoch length while resuming: Lightning counts the batches
    already done (restored from the checkpoint) towards that length.

    ``position``, when given, is asked at the start of every pass for ``(epoch, samples to skip)``
    and overrides ``set_epoch`` / ``resume``; the datamodule derives it from the trainer.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        position: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.position = position
        self.resume_epoch = -1
        self.resume_skip = 0

    def resume(self, epoch: int, skip: int) -> None:
        """Skip the first ``skip`` samples of epoch ``epoch`` (other epochs are not affected)."""
        self.resume_epoch, self.resume_skip = epoch, skip

    def __iter__(self) -> Iterator[int]:
        if self.position is not None:
            self.epoch, skip = self.position()
            self.resume(self.epoch, skip)
        indices = super().__iter__()
        if self.epoch == self.resume_epoch and self.resume_skip > 0:
            return itertools.islice(indices, self.resume_skip, None)
        return indices


class PretrainDataModule(TokenizedDataModule):
    """Packed next-token-prediction windows over plain-text / JSONL files (see the module docstring).

    Args:
        train_files: files or glob patterns; text files are one document each, ``.jsonl`` files one
            document per line's ``text`` field. Order is kept (globs expand sorted).
        tokenizer_path: SentencePiece ``tokenizer.model``.
        max_seq_len: tokens per sample (each window holds ``max_seq_len + 1``).
        batch_size: samples per batch, per rank.
        val_fraction: share of windows held out for validation (at least one window).
        seed: fixes the train/val split and the per-epoch training order (``seed + epoch``),
            independently of the global RNG.
        num_workers: dataloader worker processes.
        cache_dir: where packed token files are kept, one per (inputs, tokenizer) content.
    """

    def __init__(
        self,
        train_files: list[str] | str = "data/tinyshakespeare.txt",
        tokenizer_path: str = "data/tokenizer.model",
        max_seq_len: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        seed: int = 42,
        num_workers: int = 0,
        cache_dir: str = "data/cache",
    ) -> None:
        super().__init__(tokenizer_path, batch_size, val_fraction, seed, num_workers, allow_zero_val=False)
        check_ints(("max_seq_len", max_seq_len, 1))
        self.save_hyperparameters()
        self.train_files = train_files
        self.max_seq_len = max_seq_len
        self.cache_dir = cache_dir

        self._key: str | None = None
        self._meta: dict[str, Any] | None = None
        self.train_dataset: PackedWindows | None = None
        self.val_dataset: PackedWindows | None = None
        self._sampler: ResumableSampler | None = None
        self._resume_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------ tokens on disk

    @property
    def cache_path(self) -> Path:
        """``<cache_dir>/<key>.bin`` for the current inputs and tokenizer (hashes the inputs once)."""
        if self._key is None:
            files = resolve_files(self.train_files)
            self._key = cache_key(files, self.tokenizer.content_hash)
        return Path(self.cache_dir) / f"{self._key}.bin"

    def prepare_data(self) -> None:
        bin_path = self.cache_path
        meta_path = bin_path.with_suffix(".json")
        if _read_cache(bin_path, meta_path) is not None:
            return
        meta = build_token_file(resolve_files(self.train_files), self.tokenizer, bin_path)
        meta["key"] = bin_path.stem
        # The sidecar is written last: its presence marks a complete token file.
        _write_json_atomic(meta_path, meta)

    def setup(self, stage: str | None = None) -> None:
        if self._meta is not None:
            return
        bin_path = self.cache_path
        meta = _read_cache(bin_path, bin_path.with_suffix(".json"))
        if meta is None:
            # Lightning runs prepare_data only on local rank 0 of each node (or global rank 0 with
            # prepare_data_per_node=False); build here when this process could not see its result.
            self.prepare_data()
            meta = _read_cache(bin_path, bin_path.with_suffix(".json"))
            assert meta is not None
        num_windows = (meta["num_tokens"] - 1) // self.max_seq_len
        if num_windows < 2:
            raise ValueError(
                f"train_files {self.train_files!r} give {meta['num_tokens']} tokens, fewer than the "
                f"2 * max_seq_len + 1 = {2 * self.max_seq_len + 1} needed for one training and one "
                "validation window: add data or lower max_seq_len"
            )
        num_val = min(max(1, round(num_windows * self.val_fraction)), num_windows - 1)
        order = np.random.default_rng(self.seed).permutation(num_windows)
        args = (bin_path, meta["dtype"], meta["num_tokens"], self.max_seq_len)
        self.val_dataset = PackedWindows(*args, np.sort(order[:num_val]))
        self.train_dataset = PackedWindows(*args, np.sort(order[num_val:]))
        self._meta = meta

    @property
    def num_tokens(self) -> int:
        self.setup()
        assert self._meta is not None
        return int(self._meta["num_tokens"])

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes of document text per token over the whole stream (EOS tokens included).

        Bits per byte = (mean loss in nats per token) / ln 2 / ``bytes_per_token``. It is the
        corpus average; the validation windows are a random sample of the same stream.
        """
        self.setup()
        assert self._meta is not None
        return self._meta["num_bytes"] / self._meta["num_tokens"]

    # ----------------------------------------------------------------------------------- loaders

    def train_dataloader(self) -> DataLoader:
        self.setup()
        assert self.train_dataset is not None
        num_replicas, rank = self.replicas()
        per_rank = len(self.train_dataset) // num_replicas
        if per_rank < self.batch_size:
            raise ValueError(
                f"{len(self.train_dataset)} training windows of max_seq_len={self.max_seq_len} give "
                f"{per_rank} per rank over {num_replicas} rank(s), fewer than batch_size={self.batch_size}: "
                "add data or lower batch_size / max_seq_len"
            )
        self._check_resume(num_replicas)
        position = self._data_position if self.trainer is not None else None
        self._sampler = ResumableSampler(self.train_dataset, num_replicas, rank, self.seed, position=position)
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=self._sampler,
            drop_last=True,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        self.setup()
        assert self.val_dataset is not None
        # Plain sequential loader: under DDP Lightning shards it with its own DistributedSampler.
        return DataLoader(
            self.val_dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers
        )

    # ------------------------------------------------------------------------------------ resume
    #
    # The training data is one stream: epoch e is permutation seed + e, cut into batches_per_epoch
    # batches, and batch g of the run is batch g % batches_per_epoch of epoch g // batches_per_epoch.
    # Each pass of the sampler starts at g = the batches whose training_step has finished, which
    # Lightning's loop counter (batch_progress.total.processed) holds and restores from every
    # checkpoint. Counting from the trainer, not from the sampler, matters twice over: workers
    # prefetch, so the sampler runs ahead of training; and Lightning's epoch numbering can shift on
    # resume (a fit() stopped by max_steps is booked as a finished epoch, and its checkpoint resumes
    # in the next epoch at the same batch_idx), while the count of batches done stays exact.
    # The datamodule's own state only guards that the stream is the same one.

    def _batches_per_epoch(self) -> int:
        assert self._sampler is not None and self.trainer is not None
        batches = len(self._sampler) // self.batch_size
        # Lightning's epoch is shorter under limit_train_batches (an int, or a fraction as in its
        # _parse_num_batches); the rest of that permutation is never used.
        limit = self.trainer.limit_train_batches
        if isinstance(limit, int):
            return max(1, min(batches, limit))
        return max(1, int(batches * limit)) if limit is not None and limit < 1.0 else batches

    def _batches_done(self) -> int:
        assert self.trainer is not None
        return int(self.trainer.fit_loop.epoch_loop.batch_progress.total.processed)

    def _data_position(self) -> tuple[int, int]:
        """(epoch, samples of it to skip) for a sampler pass starting now."""
        epoch, batch = divmod(self._batches_done(), self._batches_per_epoch())
        return epoch, batch * self.batch_size

    def _compat(self, num_replicas: int) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "num_replicas": num_replicas,
            "seed": self.seed,
            "data_key": self.cache_path.stem,
        }

    def _check_resume(self, num_replicas: int) -> None:
        state = self._resume_state
        if state is None:
            return
        saved, current = {k: state.get(k) for k in self._compat(num_replicas)}, self._compat(num_replicas)
        if saved != current:
            diff = ", ".join(
                f"{k}: checkpoint {saved[k]!r}, now {current[k]!r}" for k in current if saved[k] != current[k]
            )
            raise ValueError(
                "cannot resume the training data order exactly: the checkpoint's data stream was saved "
                f"under different settings ({diff}). Resume with the original settings, or load only "
                "the weights to start a new run."
            )

    def state_dict(self) -> dict[str, Any]:
        num_replicas = self._sampler.num_replicas if self._sampler is not None else self.replicas()[0]
        state = self._compat(num_replicas)
        if self._sampler is not None and self.trainer is not None:
            # Informative only (resume reads Lightning's counter): where the next batch comes from.
            state["epoch"], skip = self._data_position()
            state["batches_consumed"] = skip // self.batch_size
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores the datamodule before it calls train_dataloader() in fit(), so the
        # check runs before any data is drawn.
        self._resume_state = dict(state_dict)
        # Lightning only recognises a resumable *DataLoader* (one with state_dict); ours resumes
        # through the loop counters, so its "dataloader is not resumable" warning would be false here.
        warnings.filterwarnings("ignore", message=_NOT_RESUMABLE_WARNING, category=PossibleUserWarning)
