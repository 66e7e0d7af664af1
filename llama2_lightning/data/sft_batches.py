"""SFT samples into batches: packing several short samples into one row (with the masks that keep them
apart), the dataset and the collator."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from llama2_lightning.losses import IGNORE_INDEX

# ---------------------------------------------------------------------------------------- packing


def pack_lengths(lengths: Sequence[int], max_seq_len: int) -> list[list[int]]:
    """Group sample indices into rows of total length <= ``max_seq_len``: best-fit decreasing.

    Longest samples are placed first, each into the open row with the least room that still
    holds it. Rows are kept in buckets by free space, so a placement costs O(max_seq_len) rather
    than a scan of every row. Deterministic: a stable sort, and ties go to the latest row.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    by_free: list[list[int]] = [[] for _ in range(max_seq_len + 1)]  # free space -> row indices
    for i in order:
        n = lengths[i]
        if not 0 < n <= max_seq_len:
            raise ValueError(f"sample {i} has {n} tokens; packing needs 1..max_seq_len={max_seq_len}")
        free = next((f for f in range(n, max_seq_len + 1) if by_free[f]), None)
        if free is None:
            row, free = len(rows), max_seq_len
            rows.append([])
        else:
            row = by_free[free].pop()
        rows[row].append(i)
        by_free[free - n].append(row)
    return rows


def pack_samples(samples: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate samples into one row with per-dialog ``position_ids`` and ``segment_ids``.

    Each sample's labels end with its own final target, so no position predicts the next dialog's
    first token; segment ids start at 1 so that 0 can mark padding.
    """
    return {
        "input_ids": torch.cat([s["input_ids"] for s in samples]),
        "labels": torch.cat([s["labels"] for s in samples]),
        "position_ids": torch.cat([torch.arange(len(s["input_ids"])) for s in samples]),
        "segment_ids": torch.cat(
            [torch.full((len(s["input_ids"]),), k, dtype=torch.long) for k, s in enumerate(samples, start=1)]
        ),
    }


def packed_attention_mask(segment_ids: Tensor) -> Tensor:
    """Bool (B, 1, T, T), True where query t may attend key s: s <= t and both in one segment.

    ``segment_ids`` (B, T). Padding (segment 0) attends to earlier padding, itself included, so no
    query row is all False (SDPA returns NaN for those); pads carry label -100.
    """
    T = segment_ids.size(-1)
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()  # (T, T)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]  # (B, 1, T, T)


# ----------------------------------------------------------------------------- dataset, collate


class SFTDataset(Dataset):
    """A list of ready samples (dicts of 1-D long tensors)."""

    def __init__(self, samples: list[dict[str, Tensor]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.samples[index]


class SFTCollator:
    """Right-pad a list of samples to the longest one: ``input_ids`` with ``pad_id``, ``labels``
    with -100, ``position_ids`` and ``segment_ids`` with 0. A class (not a lambda) so dataloader
    workers can pickle it."""

    def __init__(self, pad_id: int) -> None:
        self.pad_values = {"input_ids": pad_id, "labels": IGNORE_INDEX, "position_ids": 0, "segment_ids": 0}

    def __call__(self, samples: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        T = max(len(s["input_ids"]) for s in samples)
        batch: dict[str, Tensor] = {}
        for key in samples[0]:
            out = torch.full((len(samples), T), self.pad_values[key], dtype=torch.long)  # (B, T)
            for b, s in enumerate(samples):
                out[b, : len(s[key])] = s[key]
            batch[key] = out
        return batch
