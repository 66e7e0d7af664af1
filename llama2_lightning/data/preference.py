"""Preference pairs for the reward models (Touvron et al. 2023, section 3.2.2).

Sources
    Each source is a JSONL file (plain or gzip, sniffed) in one of two formats:

    * ``"pairs"``: ``{"prompt": str | "messages": [chat messages ending with a user turn],
      "chosen": str, "rejected": str, "margin_label"?: str | null, "is_safety"?: bool}``.
      ``margin_label`` is one of ``significantly_better``, ``better``, ``slightly_better``,
      ``negligibly_better`` (the paper's four ratings); missing or null means no rating (margin 0).
    * ``"hh"``: Anthropic HH-RLHF, ``{"chosen": dialog, "rejected": dialog}``, two whole dialogs
      that share everything but the last Assistant turn (``dialogs.hh_pair_to_prompt_and_answers``).

Encoding
    Each side is ``encode_dialog(prompt + [assistant answer])`` in the Llama 2-Chat format, so it
    ends with the answer's EOS, where the reward model reads its score. A pair longer than
    ``max_seq_len`` loses its *oldest* tokens: the same number from the front of both sides (their
    prompts are identical, so both still see the same context) and the first kept token is replaced
    by BOS, which every sequence the model was trained on starts with. The last turn (the question
    and the answer) is never cut; a pair whose last turn alone does not fit is dropped as too long.
    Pairs whose two sides encode to the same ids (chosen == rejected, e.g. line 722 of the shipped
    HH helpful file) carry no preference and are dropped and counted.

Held-out split
    Per source, ``val_fraction`` of its *distinct* pairs go to validation (identical pairs go to the
    same side), so a reward model is evaluated on pairs it never trained on. Which pairs is decided
    by each pair's content and ``seed`` (``data.split``), not by the file's position in ``sources``:
    the helpfulness and safety configs list the HH files in opposite orders and still hold out the
    same pairs, so cross-evaluating one RM on the other's held-out set scores no training pair. ``val_sources`` adds whole files to validation only; a training pair that also
    occurs in validation is removed from training. The held-out set is never reweighted.

Mixing (training split only)
    ``weight`` is a source's fraction of the *whole* training mixture; a source without a weight is
    used whole, once, and weight 0 keeps a source for validation only. The weighted sources fill their
    fractions around the whole ones: with whole sources present the weights must sum to less than 1,
    and the mixture has ``sum(whole sources' pairs) / (1 - sum(weights))`` pairs; when every source is
    weighted, the weights are normalised to sum to 1 and the first source is used whole, once (it sets
    the size). A weighted source contributes ``round(total * fraction)`` pairs, a seeded sample without
    replacement, or whole repeats plus a seeded remainder when it has fewer pairs than that. Examples:

    * safety RM, the paper's 90% safety (Meta Safety and Anthropic Harmless, both whole) / 10%
      helpfulness: ``[{meta_safety}, {harmless}, {meta_helpful, weight: 0.05}, {open_helpful, weight: 0.05}]``;
    * the same with one safety source: ``[{safety, weight: 0.9}, {helpful, weight: 0.1}]``;
    * helpfulness RM, all helpfulness data plus an equal amount split between safety and open data:
      ``[{helpful, weight: 0.5}, {safety, weight: 0.25}, {open, weight: 0.25}]``;
    * plain concatenation: no weights.

    The mixture is drawn once, at setup, from ``seed`` (the paper trains reward models one epoch).

Batches
    ``B`` pairs become one ``(2B, T)`` batch so the reward model scores both sides in one forward:
    rows ``0..B-1`` are the chosen sides, rows ``B..2B-1`` the rejected ones in the same order,
    right-padded with the tokenizer's pad id. See :func:`collate_preference_pairs`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from llama2_lightning.chat import encode_side, truncate_pair
from llama2_lightning.data.base import SourcedDataModule, check_choice, check_ints
from llama2_lightning.data.preference_sources import (  # noqa: F401  (re-exported: callers and tests import them from here)
    _RECORD_PARSERS,
    MARGIN_LABELS,
    SOURCE_FORMATS,
    RawPair,
    SourceSpec,
    _hh_record,
    _limited,
    _pairs_record,
    parse_sources,
)
from llama2_lightning.data.split import heldout_keys
from llama2_lightning.jsonl import read_jsonl

# ---------------------------------------------------------------------------------------------- encoding


@dataclass
class PreferencePair:
    """A tokenised pair: both sides end with the answer's EOS and share everything before the answer."""

    chosen: list[int]
    rejected: list[int]
    margin_label: str | None
    is_safety: bool
    source: int
    line: int

    @property
    def key(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return tuple(self.chosen), tuple(self.rejected)


# ---------------------------------------------------------------------------------------------- batches


class PreferenceDataset(Dataset):
    def __init__(self, pairs: Sequence[PreferencePair]) -> None:
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        p = self.pairs[index]
        return {
            "chosen": torch.tensor(p.chosen, dtype=torch.long),  # (Tc,)
            "rejected": torch.tensor(p.rejected, dtype=torch.long),  # (Tr,)
            "margin_label": p.margin_label,
            "is_safety": p.is_safety,
            "source": p.source,
        }


def collate_preference_pairs(samples: Sequence[Mapping[str, Any]], pad_id: int) -> dict[str, Any]:
    """``B`` pairs -> one right-padded batch of ``2B`` sequences, chosen rows first.

    Returns ``input_ids`` (2B, T) long and ``attention_mask`` (2B, T) bool (T = longest side in the
    batch), ``lengths`` (2B,) long, ``margin_label`` list of B labels or None, ``is_safety`` (B,)
    bool, ``source`` (B,) long (index into the data module's ``source_names``). Scores ``s`` of the
    batch split as ``s[:B]`` chosen, ``s[B:]`` rejected.
    """
    seqs = [s["chosen"] for s in samples] + [s["rejected"] for s in samples]
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)  # (2B,)
    T = int(lengths.max()) if len(seqs) else 0
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (2B, T)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = s
    attention_mask = torch.arange(T)[None, :] < lengths[:, None]  # (2B, T)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "lengths": lengths,
        "margin_label": [s["margin_label"] for s in samples],
        "is_safety": torch.tensor([bool(s["is_safety"]) for s in samples], dtype=torch.bool),  # (B,)
        "source": torch.tensor([int(s["source"]) for s in samples], dtype=torch.long),  # (B,)
    }


def mixture_counts(train_sizes: Sequence[int], weights: Sequence[float | None]) -> list[int]:
    """Training pairs drawn from each source: ``weights`` are fractions of the whole mixture, ``None``
    uses a source whole, 0 none of it (module docstring, "Mixing")."""
    weighted = [i for i, w in enumerate(weights) if w]
    whole = [i for i, w in enumerate(weights) if w is None]
    if not weighted:
        return [n if w is None else 0 for n, w in zip(train_sizes, weights)]
    total_weight = sum(weights[i] for i in weighted)
    if whole:
        if total_weight >= 1:
            raise ValueError(f"sources {weighted} have weights summing to {total_weight:g}, but sources {whole} are "
                             "used whole (no weight): a weight is a fraction of the whole mixture, so beside whole "
                             "sources the weights must sum to less than 1")
        total = sum(train_sizes[j] for j in whole) / (1 - total_weight)
        if total == 0:
            raise ValueError(f"sources {whole} are used whole but have no training pairs, and the weighted "
                             f"sources {weighted} are fractions of the mixture they set the size of")
        fraction = {i: weights[i] for i in weighted}
    else:
        if not weights[0]:
            raise ValueError("sources[0].weight must be > 0: when every source is weighted, the primary source is "
                             "used whole and sets the size of the mixture")
        fraction = {i: weights[i] / total_weight for i in weighted}
        total = train_sizes[0] / fraction[0]
    return [n if w is None else (int(round(total * fraction[i])) if i in fraction else 0)
            for i, (n, w) in enumerate(zip(train_sizes, weights))]


def sample_indices(n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` indices into ``n`` items: without replacement when ``count <= n``, else whole repeats
    plus a sample of the remainder, so every item appears ``count // n`` or one more times."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    repeats, rest = divmod(count, n)
    parts = [np.arange(n)] * repeats + [np.sort(rng.choice(n, size=rest, replace=False))]
    return np.concatenate(parts).astype(np.int64)


# ---------------------------------------------------------------------------------------------- module


@dataclass
class SourceStats:
    name: str
    path: str
    format: str
    split: Literal["train", "val"]
    weight: float | None = None
    records: int = 0  # JSON objects read
    bad_lines: int = 0  # skipped with on_bad_line="skip" (unreadable lines and invalid records)
    bad_line_numbers: list[int] = field(default_factory=list)
    identical: int = 0  # chosen and rejected encode to the same ids: dropped
    identical_lines: list[int] = field(default_factory=list)
    too_long: int = 0  # last turn longer than max_seq_len: dropped
    truncated: int = 0  # oldest context dropped to fit
    pairs: int = 0  # kept after the above
    train: int = 0  # distinct-split training pairs (before mixing)
    val: int = 0
    train_sampled: int = 0  # after mixing: what one training epoch sees


class PreferenceDataModule(SourcedDataModule):
    """Reward-model preference pairs (module docstring for formats, truncation, split and mixing).

    Args:
        sources: training sources, ``[{path, format: pairs|hh, weight, is_safety, name, limit}]``;
            ``weight`` is a fraction of the whole mixture, none: the source whole ("Mixing" above).
            ``is_safety`` is the default for records that carry none.
        tokenizer_path: SentencePiece ``tokenizer.model``, Hugging Face ``tokenizer.json``, a ``.gguf``
            or a directory holding one.
        max_seq_len: longest sequence (either side of a pair), in tokens.
        batch_size: pairs per batch (the model sees ``2 * batch_size`` sequences).
        val_fraction: share of each training source's distinct pairs held out for validation.
        val_sources: extra validation-only sources (same keys; ``weight`` is ignored).
        seed: fixes the held-out split, the mixture and the shuffling order.
        num_workers: dataloader worker processes.
        on_bad_line: ``"error"`` raises naming file and line; ``"skip"`` drops and counts the line.
        chat_template: ``llama2`` (the Llama 2-Chat format), ``model`` (the tokenizer's own Jinja
            template) or a ``.jinja`` file. Left truncation knows the Llama 2 format's turns only, so
            with a template a pair longer than ``max_seq_len`` is dropped (counted as too long).
    """

    def __init__(
        self,
        sources: list[dict[str, Any]],
        tokenizer_path: str = "data/tokenizer.model",
        max_seq_len: int = 512,
        batch_size: int = 8,
        val_fraction: float = 0.05,
        val_sources: list[dict[str, Any]] | None = None,
        seed: int = 42,
        num_workers: int = 0,
        on_bad_line: Literal["error", "skip"] = "error",
        chat_template: str = "llama2",
    ) -> None:
        super().__init__(tokenizer_path, batch_size, val_fraction, seed, num_workers, allow_zero_val=True)
        self.chat_template = chat_template
        self.sources = parse_sources(sources, "sources")
        if not self.sources:
            raise ValueError("sources is empty: give at least one preference file")
        self.val_source_specs = parse_sources(val_sources or [], "val_sources")
        check_ints(("max_seq_len", max_seq_len, 8))
        if val_fraction == 0.0 and not self.val_source_specs:
            raise ValueError("no held-out data: set val_fraction > 0 or give val_sources")
        check_choice("on_bad_line", on_bad_line, ("error", "skip"))
        self.save_hyperparameters()
        self.max_seq_len = max_seq_len
        self.on_bad_line = on_bad_line

        self.train_dataset: PreferenceDataset | None = None
        self.val_dataset: PreferenceDataset | None = None
        self.stats: dict[str, Any] = {}

    @property
    def heldout_dataset(self) -> PreferenceDataset:
        """The pairs no training batch contains (the validation/test set)."""
        self.setup()
        assert self.val_dataset is not None
        return self.val_dataset

    # ------------------------------------------------------------------------------------ reading
    def _read_source(self, spec: SourceSpec, index: int, stats: SourceStats) -> list[PreferencePair]:
        reader = read_jsonl(spec.path, self.on_bad_line)
        parse = _RECORD_PARSERS[spec.format]
        tok = self.tokenizer
        pairs: list[PreferencePair] = []

        for line, record in _limited(reader, spec.limit):
            stats.records += 1
            try:
                raw = parse(record, line)
                chosen = encode_side(tok, raw.prompt, raw.chosen, self.template)
                rejected = encode_side(tok, raw.prompt, raw.rejected, self.template)
            except ValueError as err:  # a malformed record or dialog: the same policy as a bad line
                if self.on_bad_line == "error":
                    raise ValueError(f"{spec.path}:{line}: {err}") from err
                stats.bad_lines += 1
                stats.bad_line_numbers.append(line)
                continue
            if chosen == rejected:
                stats.identical += 1
                stats.identical_lines.append(line)
                continue
            if self.template is None:
                fitted = truncate_pair(chosen, rejected, self.max_seq_len, tok.bos_id)
            else:
                fitted = (chosen, rejected) if max(len(chosen), len(rejected)) <= self.max_seq_len else None
            if fitted is None:
                stats.too_long += 1
                continue
            stats.truncated += max(len(chosen), len(rejected)) > self.max_seq_len
            is_safety = raw.is_safety if raw.is_safety is not None else bool(spec.is_safety)
            pairs.append(PreferencePair(fitted[0], fitted[1], raw.margin_label, is_safety, index, line))
        stats.bad_lines += reader.skipped
        stats.bad_line_numbers = sorted(stats.bad_line_numbers + reader.skipped_lines)
        stats.pairs = len(pairs)
        return pairs

    def _split(self, pairs: list[PreferencePair]) -> tuple[list[PreferencePair], list[PreferencePair]]:
        """Held-out split by content (``data.split``); duplicates land on the same side."""
        keys = [p.key for p in pairs]  # two id tuples each: built once
        val_keys = heldout_keys(keys, self.val_fraction, self.seed)
        return ([p for p, k in zip(pairs, keys) if k not in val_keys],
                [p for p, k in zip(pairs, keys) if k in val_keys])

    # ------------------------------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        all_stats: list[SourceStats] = []
        trains: list[list[PreferencePair]] = []
        val: list[PreferencePair] = []
        for i, spec in enumerate(self.sources):
            st = SourceStats(spec.name, str(spec.path), spec.format, "train", spec.weight)
            train_i, val_i = self._split(self._read_source(spec, i, st))
            trains.append(train_i)
            val += val_i
            all_stats.append(st)
        for j, spec in enumerate(self.val_source_specs, start=len(self.sources)):
            st = SourceStats(spec.name, str(spec.path), spec.format, "val")
            val_j = self._read_source(spec, j, st)
            val += val_j
            all_stats.append(st)

        # A pair both held out and in a training file (a duplicate across sources, or a val_sources
        # file overlapping a training one) must not be trained on.
        val_keys = {p.key for p in val}
        overlap = 0
        for i, train_i in enumerate(trains):
            kept = [p for p in train_i if p.key not in val_keys]
            overlap += len(train_i) - len(kept)
            trains[i] = kept
        for p in val:
            all_stats[p.source].val += 1
        for i, train_i in enumerate(trains):
            all_stats[i].train = len(train_i)

        sizes = [len(t) for t in trains]
        if sizes[0] == 0:
            raise ValueError(
                f"the primary source {self.sources[0].path} has no training pairs left: {all_stats[0].records} "
                f"records read, {all_stats[0].bad_lines} bad lines skipped, {all_stats[0].identical} with identical "
                f"answers, {all_stats[0].too_long} longer than max_seq_len={self.max_seq_len}, "
                f"{all_stats[0].val} held out for validation"
            )
        counts = mixture_counts(sizes, [s.weight for s in self.sources])
        mixed: list[PreferencePair] = []
        for i, (train_i, count) in enumerate(zip(trains, counts)):
            if count > 0 and not train_i:
                raise ValueError(
                    f"sources[{i}] ({self.sources[i].path}) has weight {self.sources[i].weight} but no training pairs"
                )
            picked = sample_indices(len(train_i), count, np.random.default_rng([self.seed, i, 1])) if count else []
            mixed += [train_i[k] for k in picked]
            all_stats[i].train_sampled = len(picked)

        if not val:
            raise ValueError(f"no held-out pairs: the sources {[str(s.path) for s in self.sources]} are too small for "
                             f"val_fraction={self.val_fraction} ({sum(st.pairs for st in all_stats)} pairs kept); "
                             "give val_sources")
        self.train_dataset = PreferenceDataset(mixed)
        self.val_dataset = PreferenceDataset(val)
        self.stats = {
            "sources": [dataclasses.asdict(s) for s in all_stats],
            "bad_lines": sum(s.bad_lines for s in all_stats),
            "identical": sum(s.identical for s in all_stats),
            "too_long": sum(s.too_long for s in all_stats),
            "truncated": sum(s.truncated for s in all_stats),
            "train_overlapping_val": overlap,
            "train_pairs": len(mixed),
            "val_pairs": len(val),
        }
        self._log_stats(all_stats)

    def _log_stats(self, all_stats: list[SourceStats]) -> None:
        lines = [f"preference data (max_seq_len={self.max_seq_len}, seed={self.seed}):"]
        for s in all_stats:
            lines.append(
                f"  {s.name} [{s.split}, {s.format}] {s.records} records: {s.bad_lines} bad lines, "
                f"{s.identical} identical pairs, {s.too_long} too long, {s.truncated} truncated -> "
                f"{s.train} train (x{s.train_sampled} after mixing, weight {s.weight}), {s.val} held out"
            )
        st = self.stats
        lines.append(
            f"  total: {st['train_pairs']} training pairs per epoch, {st['val_pairs']} held out, "
            f"{st['train_overlapping_val']} training duplicates of held-out pairs removed"
        )
        rank_zero_info("\n".join(lines))

    # ----------------------------------------------------------------------------------- loaders
    def _collate(self) -> functools.partial:
        return functools.partial(collate_preference_pairs, pad_id=self.tokenizer.pad_id)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        assert self.train_dataset is not None
        # Shuffle from our seed, independent of the global RNG; under DDP Lightning swaps in a
        # DistributedSampler (seeded from the global seed) that shards it.
        return DataLoader(
            self.train_dataset, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
            collate_fn=self._collate(), generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        self.setup()
        assert self.val_dataset is not None
        return DataLoader(self.val_dataset, batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, collate_fn=self._collate())

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
