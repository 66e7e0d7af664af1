"""Supervised fine-tuning data: dialogs -> Llama 2-Chat token ids with answer-only targets.

Pipeline (all in ``setup``, in memory: SFT sets are small next to pretraining corpora)
    1. Each source (a JSONL file in one of three formats) is read into dialogs and each dialog is
       encoded with :func:`llama2_lightning.chat.encode_dialog`; a bad record (not JSON, wrong
       shape, or rejected by the chat format) is reported as ``<path>:<line>: why`` or skipped
       and counted (``on_bad_line``).
    2. A seeded permutation sends whole dialogs to validation *before* any length filtering, so
       changing ``max_seq_len`` or ``truncation`` never moves a dialog between the splits.
    3. Each dialog is fitted to ``max_seq_len`` (see :func:`fit_to_length`); drops and
       truncations are counted in ``SFTDataModule.stats`` and logged once.
    4. Optionally several dialogs are packed into one row (best-fit decreasing, see :func:`pack_lengths`).

Samples are dicts of ``torch.long`` tensors of one length T <= ``max_seq_len``:
    ``input_ids`` = ids[:-1]; ``labels[t]`` = ids[t + 1] where that token is part of an answer
    (answer text and its EOS), else -100 (the ignore index of ``F.cross_entropy``). The final EOS is
    a target only, never an input, so a dialog of n tokens needs n - 1 positions.
Packed rows add ``position_ids`` (restarting at 0 for every dialog, so RoPE sees each dialog as if
alone) and ``segment_ids`` (1, 2, ... per dialog, 0 on padding); feed the model
``positions=position_ids, mask=packed_attention_mask(segment_ids)``. Unpacked batches need no mask:
they are right-padded, and under causal attention a real token never sees a later pad, so the
model's default causal attention is exact for them and pad positions carry label -100.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from llama2_lightning.chat import B_INST, E_INST, Message, encode_dialog
from llama2_lightning.chat_template import ChatTemplate
from llama2_lightning.data.base import TokenizedDataModule, check_choice, check_ints
from llama2_lightning.data.readers import parse_hh_dialog, self_instruct_to_dialogs
from llama2_lightning.data.sft_batches import (  # noqa: F401  (re-exported: callers and tests import them from here)
    SFTCollator,
    SFTDataset,
    pack_lengths,
    pack_samples,
    packed_attention_mask,
)
from llama2_lightning.jsonl import read_jsonl
from llama2_lightning.losses import IGNORE_INDEX
from llama2_lightning.tokenizer import Tokenizer

SourceFormat = Literal["messages", "self_instruct", "hh_chosen"]
SOURCE_FORMATS: tuple[str, ...] = ("messages", "self_instruct", "hh_chosen")
DEFAULT_SOURCE_PATH = "data/sft/self_instruct_seed_tasks.jsonl"


@dataclass
class SFTSource:
    """One input file. In YAML: ``{path: ..., format: messages|self_instruct|hh_chosen, limit: N}``.

    Formats (each a JSONL file, optionally gzipped):
      * ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
        ending with an assistant turn (optional system first, then alternating user/assistant);
      * ``self_instruct``: self-instruct seed tasks, one dialog per instance (instruction + input
        as the user turn, output as the answer);
      * ``hh_chosen``: Anthropic HH-RLHF pairs; the ``chosen`` dialog, split into its
        Human/Assistant turns.
    ``limit`` keeps the first N dialogs of the file (in file order, before the split), the way to
    set mixing ratios between sources.
    """

    path: str
    format: SourceFormat = "messages"
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.format not in SOURCE_FORMATS:
            raise ValueError(
                f"source {self.path!r}: format {self.format!r} is not one of {list(SOURCE_FORMATS)}"
            )
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"source {self.path!r}: limit must be >= 1 or null, got {self.limit}")


def as_source(spec: SFTSource | Mapping[str, Any] | str) -> SFTSource:
    """Accept a dataclass, a dict (as written in YAML or Python) or a bare path (``messages``)."""
    if isinstance(spec, SFTSource):
        return spec
    if isinstance(spec, str):
        return SFTSource(path=spec)
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"path", "format", "limit"}
        if unknown or "path" not in spec:
            raise ValueError(
                f"source {dict(spec)!r}: expected keys 'path' (required), 'format', 'limit'"
                + (f"; unknown: {sorted(unknown)}" if unknown else "")
            )
        return SFTSource(**spec)
    raise TypeError(f"a source must be an SFTSource, a dict or a path string, got {type(spec).__name__}")


# ---------------------------------------------------------------------------------- reading files


@dataclass
class Dialog:
    messages: list[Message]
    origin: str  # "<path>:<line>", for messages that point the user at the record
    # Filled when read with a tokenizer: encode_dialog's ids and answer mask.
    ids: list[int] | None = None
    mask: list[bool] | None = None
    # Per-message flags: only flagged assistant turns train (Ghost Attention: the last answer only).
    train_turns: list[bool] | None = None


def _record_dialogs(record: dict[str, Any], fmt: str) -> list[list[Message]]:
    if fmt == "messages":
        messages = record.get("messages")
        if not isinstance(messages, list):
            raise ValueError("expected an object with a 'messages' list")
        return [messages]
    if fmt == "self_instruct":
        return self_instruct_to_dialogs(record)
    chosen = record.get("chosen")
    if not isinstance(chosen, str):
        raise ValueError("expected an object with a 'chosen' string")
    dialog = parse_hh_dialog(chosen)
    if dialog[-1]["role"] != "assistant":
        raise ValueError("the chosen dialog must end with an Assistant turn")
    return [dialog]


def _has_empty_turn(messages: list[Message]) -> bool:
    return any(isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
               and not m["content"].strip() for m in messages)


def read_source(
    source: SFTSource,
    on_bad_line: Literal["error", "skip"] = "error",
    tokenizer: Tokenizer | None = None,
    counts: dict[str, int] | None = None,
    template: ChatTemplate | None = None,
) -> tuple[list[Dialog], int]:
    """(dialogs, number of bad lines skipped) of one source, in file order.

    A line is bad when it is not a JSON object (see :func:`read_jsonl`), when its record does not
    fit the source's format, or (given a ``tokenizer``, which also encodes every dialog) when the
    chat format rejects a dialog, e.g. roles out of order or no final answer. A bad line raises
    ``ValueError("<path>:<line>: ...")``, or with ``on_bad_line="skip"`` is counted and left out
    whole (all dialogs of a self-instruct record go together). A dialog with an empty user or
    assistant turn teaches nothing (or to answer with nothing): it is left out and counted in
    ``counts["empty"]``.
    """
    reader = read_jsonl(source.path, on_bad_line)
    dialogs: list[Dialog] = []
    bad_records = 0
    for lineno, record in reader:
        try:
            found = [Dialog(m, f"{source.path}:{lineno}") for m in _record_dialogs(record, source.format)]
            if source.format == "messages" and "train_turns" in record:
                turns = record["train_turns"]
                if not (isinstance(turns, list) and all(isinstance(t, bool) for t in turns)):
                    raise ValueError("'train_turns' must be a list of booleans, one per message")
                found[0].train_turns = turns
            if tokenizer is not None:
                for d in found:
                    d.ids, d.mask = encode_dialog(tokenizer, d.messages, add_generation_prompt=False, template=template,
                                                  train_turns=d.train_turns)
        except ValueError as err:
            if on_bad_line == "error":
                raise ValueError(f"{source.path}:{lineno}: {err} (format {source.format!r})") from err
            bad_records += 1
            continue
        kept = [d for d in found if not _has_empty_turn(d.messages)]
        if counts is not None and len(kept) < len(found):
            counts["empty"] = counts.get("empty", 0) + len(found) - len(kept)
        dialogs.extend(kept)
        if source.limit is not None and len(dialogs) >= source.limit:
            del dialogs[source.limit :]
            break
    return dialogs, reader.skipped + bad_records


# ---------------------------------------------------------------------------- fitting the length


@dataclass(frozen=True)
class ChatMarkers:
    """Token ids that open a turn (``<s>[INST]``) and close a prompt (``[/INST]``).

    Left truncation cuts the user text between them, so a shortened sample is still well formed.
    Empty ``head``/``close`` (a tokenizer whose markers are context dependent) fall back to
    keeping only BOS in front of the cut.
    """

    bos_id: int
    head: tuple[int, ...] = ()
    close: tuple[int, ...] = ()

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> ChatMarkers:
        head = tokenizer.encode(B_INST, bos=True)
        close = tokenizer.encode(E_INST)
        # Trust the markers only if they appear verbatim inside an encoded prompt, i.e. the
        # tokenizer splits them from the surrounding text the way Llama's does.
        probe = tokenizer.encode(f"{B_INST} probe text {E_INST}", bos=True)
        if probe[: len(head)] != head or probe[-len(close) :] != close:
            return cls(tokenizer.bos_id, (tokenizer.bos_id,), ())
        return cls(tokenizer.bos_id, tuple(head), tuple(close))


FitStatus = Literal["kept", "truncated", "dropped"]


def fit_to_length(
    ids: Sequence[int],
    mask: Sequence[bool],
    max_seq_len: int,
    mode: Literal["drop", "left"],
    markers: ChatMarkers,
) -> tuple[list[int], list[bool], FitStatus]:
    """Fit an encoded dialog into ``max_seq_len`` input positions (``len(ids) - 1``).

    ``drop``: a dialog that does not fit is dropped. ``left``: the final answer is always kept
    whole and context is removed from the left: first whole earlier turns (each ``<s>[INST] ...
    </s>`` sequence), then, if the last turn alone is still too long, the start of its user text
    (``<s>[INST]`` and ``[/INST]`` stay, so the sample is still a well-formed prompt). A dialog
    whose final answer, markers and at least one user token do not fit is dropped; an answer is
    never cut. Returns (ids, mask, status); ids and mask are empty when dropped.
    """
    if len(ids) != len(mask):
        raise ValueError(f"ids and mask differ in length: {len(ids)} vs {len(mask)}")
    n = len(ids)
    if n - 1 <= max_seq_len:
        return list(ids), list(mask), "kept"
    if mode == "drop":
        return [], [], "dropped"
    if mode != "left":
        raise ValueError(f"truncation must be 'drop' or 'left', got {mode!r}")
    if not mask[-1]:
        raise ValueError("left truncation needs a dialog that ends with an answer (mask[-1] True)")

    starts = [i for i, t in enumerate(ids) if t == markers.bos_id]
    for s in starts:
        if s > 0 and n - s - 1 <= max_seq_len:
            return list(ids[s:]), list(mask[s:]), "truncated"

    # The last turn alone is too long: cut the start of its user text.
    last = starts[-1] if starts else 0
    answer = n - 1
    while answer > last and mask[answer - 1]:
        answer -= 1
    head = list(markers.head)
    if list(ids[last : last + len(head)]) != head:
        head = [markers.bos_id]
    cut = n - (max_seq_len + 1 - len(head))  # keep head + ids[cut:], exactly max_seq_len + 1 tokens
    # At least one user token must survive between head and the closing [/INST].
    if cut < last + len(head) or cut > answer - len(markers.close) - 1:
        return [], [], "dropped"
    return head + list(ids[cut:]), [False] * len(head) + list(mask[cut:]), "truncated"


def to_sample(ids: Sequence[int], mask: Sequence[bool]) -> dict[str, Tensor]:
    """``input_ids`` = ids[:-1]; ``labels[t]`` = ids[t+1] if mask[t+1] else -100 (module docstring)."""
    ids_t = torch.tensor(ids, dtype=torch.long)
    targets = ids_t[1:].clone()
    targets[~torch.tensor(mask[1:], dtype=torch.bool)] = IGNORE_INDEX
    return {"input_ids": ids_t[:-1], "labels": targets}


# --------------------------------------------------------------------------------- data module


class SFTDataModule(TokenizedDataModule):
    """Dialogs in the Llama 2-Chat format with the loss on answer tokens only (paper section 3.1).

    Args:
        sources: input files, each ``{path, format, limit}`` (see :class:`SFTSource`); null means
            the shipped self-instruct seed tasks (``data/sft/self_instruct_seed_tasks.jsonl``).
        tokenizer_path: SentencePiece ``tokenizer.model``, Hugging Face ``tokenizer.json``, a ``.gguf``
            or a directory holding one.
        max_seq_len: input positions per sample or packed row (a dialog of n tokens needs n - 1).
        batch_size: samples (or packed rows) per batch, per rank.
        val_fraction: share of dialogs held out for validation (at least one), chosen by ``seed``.
        seed: fixes the split and the training order, independently of the global RNG.
        num_workers: dataloader worker processes.
        truncation: ``drop`` dialogs longer than ``max_seq_len``, or ``left``-truncate their
            context keeping the final answer whole (see :func:`fit_to_length`).
        packing: pack several dialogs per row; batches then carry ``position_ids`` and
            ``segment_ids`` (use :func:`packed_attention_mask`).
        on_bad_line: ``error`` stops at the first malformed line naming file and line; ``skip``
            leaves such lines out and counts them in ``stats["skipped_lines"]``.
        chat_template: ``llama2`` (the Llama 2-Chat format), ``model`` (the tokenizer's own Jinja
            template, e.g. ChatML for SmolLM2) or a ``.jinja`` file.
            ``left`` truncation knows the Llama 2 format's turn markers only: use ``drop`` with the others.
    """

    def __init__(
        self,
        sources: list[SFTSource] | None = None,
        tokenizer_path: str = "data/tokenizer.model",
        max_seq_len: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        seed: int = 42,
        num_workers: int = 0,
        truncation: Literal["drop", "left"] = "left",
        packing: bool = False,
        on_bad_line: Literal["error", "skip"] = "error",
        chat_template: str = "llama2",
    ) -> None:
        super().__init__(tokenizer_path, batch_size, val_fraction, seed, num_workers, allow_zero_val=False)
        if chat_template != "llama2" and truncation == "left":
            raise ValueError(f"truncation='left' cuts at the Llama 2 format's turn markers; with chat_template="
                             f"{chat_template!r} use truncation: drop")
        self.chat_template = chat_template
        check_ints(("max_seq_len", max_seq_len, 2))
        check_choice("truncation", truncation, ("drop", "left"))
        check_choice("on_bad_line", on_bad_line, ("error", "skip"))
        specs = sources if sources is not None else [SFTSource(DEFAULT_SOURCE_PATH, "self_instruct")]
        self.sources: list[SFTSource] = [as_source(s) for s in specs]
        if not self.sources:
            raise ValueError("sources is empty: give at least one {path, format} entry")
        # Sources are stored as plain dicts so the hparams YAML stays readable and reloadable.
        self.save_hyperparameters(ignore=["sources"])
        self.hparams["sources"] = [asdict(s) for s in self.sources]
        self.max_seq_len = max_seq_len
        self.truncation = truncation
        self.packing = packing
        self.on_bad_line = on_bad_line

        self.train_dataset: SFTDataset | None = None
        self.val_dataset: SFTDataset | None = None
        self.stats: dict[str, int] = {}
        self.split_indices: dict[str, np.ndarray] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return  # Lightning calls setup once per stage; the data is built once
        dialogs: list[Dialog] = []
        skipped = empty = 0
        for source in self.sources:
            source_counts: dict[str, int] = {}
            found, bad = read_source(source, self.on_bad_line, self.tokenizer, source_counts, self.template)
            empty += source_counts.get("empty", 0)
            skipped_note = f", {bad} bad lines skipped" if bad else ""
            if source_counts.get("empty"):
                skipped_note += f", {source_counts['empty']} dialogs with an empty turn left out"
            rank_zero_info(f"SFT source {source.path} ({source.format}): {len(found)} dialogs{skipped_note}")
            dialogs += found
            skipped += bad
        if len(dialogs) < 2:
            raise ValueError(
                f"sources {[s.path for s in self.sources]} give {len(dialogs)} dialog(s); at least 2 are "
                "needed for one training and one validation dialog"
            )

        num_val = min(max(1, round(len(dialogs) * self.val_fraction)), len(dialogs) - 1)
        order = np.random.default_rng(self.seed).permutation(len(dialogs))
        val_idx, train_idx = np.sort(order[:num_val]), np.sort(order[num_val:])
        # Indices into the sources' dialogs in order, so a user can see what was held out.
        self.split_indices = {"train": train_idx, "val": val_idx}

        markers = ChatMarkers.from_tokenizer(self.tokenizer)
        counts = {"kept": 0, "truncated": 0, "dropped": 0}

        def build(indices: np.ndarray) -> list[dict[str, Tensor]]:
            samples = []
            for i in indices:
                dialog = dialogs[int(i)]
                assert dialog.ids is not None and dialog.mask is not None
                ids, mask, status = fit_to_length(
                    dialog.ids, dialog.mask, self.max_seq_len, self.truncation, markers
                )
                counts[status] += 1
                if status != "dropped":
                    samples.append(to_sample(ids, mask))
            return samples

        train, val = build(train_idx), build(val_idx)
        if not train:
            raise ValueError(
                f"every training dialog is longer than max_seq_len={self.max_seq_len} "
                f"(truncation={self.truncation!r}): raise max_seq_len or use truncation: left"
            )
        if self.packing:
            train, val = self._pack(train), self._pack(val)
        self.train_dataset, self.val_dataset = SFTDataset(train), SFTDataset(val)
        self.stats = {
            "dialogs": len(dialogs),
            "skipped_lines": skipped,
            "empty_dialogs": empty,
            **counts,
            "train_samples": len(train),
            "val_samples": len(val),
        }
        rank_zero_info(
            f"SFT data: {len(dialogs)} dialogs ({len(train_idx)} train / {len(val_idx)} val), "
            f"max_seq_len={self.max_seq_len}: {counts['kept']} kept, {counts['truncated']} "
            f"left-truncated, {counts['dropped']} dropped; {skipped} bad lines skipped, {empty} dialogs with an "
            f"empty turn left out; "
            f"{len(train)} train / {len(val)} val {'packed rows' if self.packing else 'samples'}"
        )
        if not val:
            rank_zero_warn("no validation dialog fits max_seq_len: validation will be empty")

    def _pack(self, samples: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        rows = pack_lengths([len(s["input_ids"]) for s in samples], self.max_seq_len)
        return [pack_samples([samples[i] for i in row]) for row in rows]

    def _loader(self, split: Literal["train", "val"]) -> DataLoader:
        self.setup()
        dataset = self.train_dataset if split == "train" else self.val_dataset
        assert dataset is not None
        shuffle = split == "train"
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            # Own generator: the order depends on `seed` only, not on whatever seeded the global RNG.
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            collate_fn=SFTCollator(self.tokenizer.pad_id),
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

