"""Prompts for the RLHF stage (Touvron et al. 2023, section 3.2.3): chat dialogs ending with a user
turn, each tagged ``is_safety``, the tag that picks the safety reward model in
``R_c = R_s if is_safety(p) or R_s < 0.15 else R_h``.

Sources
    A YAML-friendly list of dicts, ``{path, format, is_safety, name, limit, label}``:

    * ``"prompts"``: JSONL ``{"prompt": str | "messages": [chat messages ending with a user turn],
      "is_safety"?: bool}``; a record's own ``is_safety`` wins over the source's.
    * ``"hh"``: Anthropic HH-RLHF pairs; the *first Human turn* of the ``chosen`` dialog is the prompt
      (the later turns answer an assistant reply the policy never wrote). The file does not say
      whether it is the helpful or the harmless set, so ``is_safety`` is required: ``true`` for
      ``harmless-base``, ``false`` for ``helpful-base``.
    * ``"xstest"``: the XSTest CSV (``id,prompt,type,label,focus,note``). Every XSTest prompt is tagged
      safety by default, the unsafe ones *and* their safe look-alikes: all 450 were written to probe
      safety behaviour ("How do I kill a Python process?" tests exaggerated refusals), and the paper
      tags prompts by the set they come from, not per prompt. Whether a compliant answer to a safe
      look-alike is good is then the safety reward model's call, which is what it was trained for
      (borderline prompts are part of Meta's safety data, section 4.2.1). ``label: unsafe`` (or
      ``safe``) keeps one half only; ``is_safety: false`` overrides the tag.
    * ``"self_instruct"``: self-instruct tasks; one prompt per instance (instruction, plus the
      instance input after a blank line), ``is_safety`` false by default.

    ``limit`` reads only the first N prompts of a source. Identical prompts (same messages) are
    kept once, with the tag of their first occurrence; the count is in ``stats``.

Held-out split
    Per source, ``val_fraction`` of its distinct prompts go to the held-out set, chosen by each
    prompt's content and ``seed`` (``data.split``), not by the source's position, *before* the length filter, so changing
    ``max_prompt_len`` never moves a prompt between the splits. ``val_sources`` add held-out-only
    files, and a training prompt that also occurs there is removed from training. ``max_val_prompts``
    caps the held-out set (generation on it runs every validation) with a seeded choice.

Batches
    ``prompt_ids`` (list of B lists of ids, variable length: generation left-pads them),
    ``is_safety`` (B,) bool, ``messages`` (list of B dialogs), ``index`` (B,) long (position in the
    split, the key rejection sampling pools answers under). Each training epoch is one RLHF
    iteration and gets exactly one batch of ``batch_size`` prompts (see :class:`IterationSampler`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from llama2_lightning.chat import encode_prompt
from llama2_lightning.data.base import SourcedDataModule, check_choice, check_ints
from llama2_lightning.data.prompt_sources import (  # noqa: F401  (re-exported: callers and tests import them from here)
    _DEFAULT_TAG,
    PROMPT_FORMATS,
    XSTEST_COLUMNS,
    Prompt,
    PromptFormat,
    PromptSource,
    _prompts_record,
    _read_jsonl_source,
    _read_xstest,
    _user,
    parse_prompt_sources,
    read_prompt_source,
)
from llama2_lightning.data.split import heldout_keys
from llama2_lightning.tokenizer import Tokenizer

DEFAULT_PROMPT_SOURCES: list[dict[str, Any]] = [
    {"path": "data/sft/self_instruct_seed_tasks.jsonl", "format": "self_instruct", "name": "self_instruct"}
]


# ---------------------------------------------------------------------------------------------- batches


class PromptDataset(Dataset):
    def __init__(self, prompts: Sequence[Prompt]) -> None:
        self.prompts = list(prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        p = self.prompts[index]
        return {"prompt_ids": p.ids, "is_safety": p.is_safety, "messages": p.messages, "index": index}


def collate_prompts(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Prompts stay unpadded lists: generation left-pads them so that every prompt ends in the same slot."""
    return {
        "prompt_ids": [list(s["prompt_ids"]) for s in samples],
        "is_safety": torch.tensor([bool(s["is_safety"]) for s in samples], dtype=torch.bool),  # (B,)
        "messages": [s["messages"] for s in samples],
        "index": torch.tensor([int(s["index"]) for s in samples], dtype=torch.long),  # (B,)
    }


class IterationSampler(DistributedSampler):
    """Exactly one batch of ``batch_size`` prompts per training epoch (= one RLHF iteration).

    The prompts form one stream: seeded permutations of the training set, one after another, and
    iteration ``i`` takes stream positions ``[i * batch_size, (i + 1) * batch_size)``; each rank
    keeps a strided share. A prompt set smaller than a batch simply wraps (the paper samples 512
    prompts per iteration from a much larger pool). The iteration number is asked from
    ``position`` (the trainer's count of finished training batches, restored from every checkpoint),
    so a resumed run draws the same prompts as an uninterrupted one without any state of its own.

    It subclasses ``DistributedSampler`` because under DDP Lightning would otherwise wrap it in a
    ``DistributedSamplerWrapper`` and shard the already-sharded indices again.
    """

    def __init__(self, dataset: Sized, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 position: Callable[[], int] | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        if batch_size % num_replicas:
            raise ValueError(f"batch_size={batch_size} prompts per iteration must divide over {num_replicas} ranks")
        self.batch_size = batch_size
        self.position = position

    def __len__(self) -> int:
        return self.batch_size // self.num_replicas

    def iteration_indices(self, iteration: int) -> list[int]:
        """All ranks' prompts of one iteration, in stream order."""
        n = len(self.dataset)  # type: ignore[arg-type]
        start = iteration * self.batch_size
        out: list[int] = []
        perms: dict[int, np.ndarray] = {}
        for pos in range(start, start + self.batch_size):
            epoch, offset = divmod(pos, n)
            if epoch not in perms:
                perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(n)
            out.append(int(perms[epoch][offset]))
        return out

    def __iter__(self) -> Iterator[int]:
        iteration = self.position() if self.position is not None else self.epoch
        return iter(self.iteration_indices(iteration)[self.rank::self.num_replicas])


# ---------------------------------------------------------------------------------------------- module


@dataclass
class PromptSourceStats:
    name: str
    path: str
    format: str
    split: Literal["train", "val"]
    records: int = 0
    empty: int = 0
    bad_lines: int = 0  # skipped with on_bad_line="skip"
    duplicates: int = 0  # same messages as an earlier prompt (this or an earlier source): dropped
    too_long: int = 0  # encoded prompt longer than max_prompt_len: dropped
    train: int = 0
    val: int = 0
    safety: int = 0  # prompts kept (either split) tagged is_safety


class PromptDataModule(SourcedDataModule):
    """RLHF prompts (module docstring for formats, tags and the split).

    Args:
        sources: training sources ``[{path, format, is_safety, name, limit, label}]``; ``None`` is the
            shipped self-instruct seed tasks (in-project data only).
        tokenizer_path: SentencePiece ``tokenizer.model``, Hugging Face ``tokenizer.json``, a ``.gguf`` or a
            directory holding one; ids must match the policy's.
        max_prompt_len: longest encoded prompt kept, in tokens; the policy's ``max_seq_len`` must
            hold it plus the answer.
        batch_size: prompts per RLHF iteration, over all ranks (paper, PPO: 512).
        val_batch_size: held-out prompts per validation batch (default ``batch_size``).
        val_fraction: share of each source's distinct prompts held out.
        val_sources: held-out-only sources (same keys).
        max_val_prompts: cap on the held-out set (a seeded choice), since it is generated on at every validation.
        system_prompt: a system message prepended to every prompt that has none (null: none, as in the
            paper's RLHF prompts).
        seed: fixes the split and the order prompts are drawn in.
        start_iteration: where in the prompt stream iteration 0 of this run starts. A later RLHF round
            run as its own fit (``init_from`` the previous round) sets it to the iterations already
            done, so it draws new prompts instead of the previous round's again.
        on_bad_line: ``"error"`` raises naming file and line; ``"skip"`` drops and counts the line.
        chat_template: ``llama2`` (the Llama 2-Chat format), ``model`` (the tokenizer's own Jinja
            template) or a ``.jinja`` file; the policy must have been trained in the same format.
    """

    def __init__(
        self,
        sources: list[dict[str, Any]] | None = None,
        tokenizer_path: str = "data/tokenizer.model",
        max_prompt_len: int = 128,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        val_fraction: float = 0.1,
        val_sources: list[dict[str, Any]] | None = None,
        max_val_prompts: int | None = None,
        system_prompt: str | None = None,
        seed: int = 42,
        start_iteration: int = 0,
        num_workers: int = 0,
        on_bad_line: Literal["error", "skip"] = "error",
        chat_template: str = "llama2",
    ) -> None:
        super().__init__(tokenizer_path, batch_size, val_fraction, seed, num_workers, allow_zero_val=True)
        self.chat_template = chat_template
        self.sources = parse_prompt_sources(DEFAULT_PROMPT_SOURCES if sources is None else sources, "sources")
        if not self.sources:
            raise ValueError("sources is empty: give at least one prompt file (or null for the shipped default)")
        self.val_source_specs = parse_prompt_sources(val_sources or [], "val_sources")
        check_ints(("max_prompt_len", max_prompt_len, 4), ("start_iteration", start_iteration, 0))
        if val_batch_size is not None and val_batch_size < 1:
            raise ValueError(f"val_batch_size must be >= 1 or null, got {val_batch_size}")
        if max_val_prompts is not None and max_val_prompts < 1:
            raise ValueError(f"max_val_prompts must be >= 1 or null, got {max_val_prompts}")
        check_choice("on_bad_line", on_bad_line, ("error", "skip"))
        self.save_hyperparameters()
        self.max_prompt_len = max_prompt_len
        self.val_batch_size = val_batch_size or batch_size
        self.max_val_prompts = max_val_prompts
        self.system_prompt = system_prompt
        self.start_iteration = start_iteration
        self.on_bad_line = on_bad_line
        self.train_dataset: PromptDataset | None = None
        self.val_dataset: PromptDataset | None = None
        self.stats: dict[str, Any] = {}

    @property
    def train_prompts(self) -> list[Prompt]:
        self.setup()
        assert self.train_dataset is not None
        return self.train_dataset.prompts

    @property
    def heldout_prompts(self) -> list[Prompt]:
        """Prompts no training batch contains."""
        self.setup()
        assert self.val_dataset is not None
        return self.val_dataset.prompts

    # ------------------------------------------------------------------------------------- setup
    def _split(self, prompts: list[Prompt]) -> tuple[list[Prompt], list[Prompt]]:
        """Held-out split by content (``data.split``): the same prompts whichever position the source has."""
        keys = [p.key for p in prompts]  # a JSON dump each: computed once
        val_keys = heldout_keys(keys, self.val_fraction, self.seed)
        return ([p for p, k in zip(prompts, keys) if k not in val_keys],
                [p for p, k in zip(prompts, keys) if k in val_keys])

    def _encode(self, prompt: Prompt) -> list[int]:
        messages = prompt.messages
        if self.system_prompt is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        try:
            return encode_prompt(self.tokenizer, messages, self.template)
        except ValueError as err:
            raise ValueError(f"{prompt.origin}: {err}") from err

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        seen: set[str] = set()
        stats_by_source: dict[int, PromptSourceStats] = {}
        train: list[Prompt] = []
        val: list[Prompt] = []
        specs = [(s, "train") for s in self.sources] + [(s, "val") for s in self.val_source_specs]
        # Held-out sources are read first for deduplication, so a prompt in both stays held out.
        order = sorted(range(len(specs)), key=lambda i: specs[i][1] != "val")
        per_source: dict[int, tuple[list[Prompt], list[Prompt]]] = {}
        for i in order:
            spec, split = specs[i]
            st = PromptSourceStats(spec.name, str(spec.path), spec.format, split)  # type: ignore[arg-type]
            prompts, counts = read_prompt_source(spec, i, self.on_bad_line)
            st.records, st.empty, st.bad_lines = counts["records"], counts["empty"], counts["bad_lines"]
            distinct = []
            for p in prompts:
                if p.key in seen:
                    st.duplicates += 1
                    continue
                seen.add(p.key)
                distinct.append(p)
            tr, va = self._split(distinct) if split == "train" else ([], distinct)
            kept_tr, kept_va = [], []
            for p, out in [(p, kept_tr) for p in tr] + [(p, kept_va) for p in va]:
                p.ids = self._encode(p)
                if len(p.ids) > self.max_prompt_len:
                    st.too_long += 1
                    continue
                out.append(p)
            st.train, st.val = len(kept_tr), len(kept_va)
            st.safety = sum(p.is_safety for p in kept_tr + kept_va)
            per_source[i] = (kept_tr, kept_va)
            stats_by_source[i] = st
        all_stats = [stats_by_source[i] for i in range(len(specs))]  # back to config order
        for i in range(len(specs)):
            train += per_source[i][0]
            val += per_source[i][1]
        if self.max_val_prompts is not None and len(val) > self.max_val_prompts:
            keep = np.sort(np.random.default_rng([self.seed, 1_000_003]).permutation(len(val))[: self.max_val_prompts])
            val = [val[k] for k in keep]
        if not train:
            counts = [dataclasses.asdict(s) for s in all_stats]
            raise ValueError(f"no training prompts left from {[str(s.path) for s in self.sources]} "
                             f"(max_prompt_len={self.max_prompt_len}; counts: {counts})")
        if not val:
            raise ValueError("no held-out prompts: set val_fraction > 0 (with at least 2 prompts) or give val_sources")
        self.train_dataset = PromptDataset(train)
        self.val_dataset = PromptDataset(val)
        self.stats = {
            "sources": [dataclasses.asdict(s) for s in all_stats],
            "train_prompts": len(train),
            "val_prompts": len(val),
            "train_safety": sum(p.is_safety for p in train),
            "val_safety": sum(p.is_safety for p in val),
        }
        lines = [f"RLHF prompts (max_prompt_len={self.max_prompt_len}, seed={self.seed}):"]
        lines += [f"  {s.name} [{s.split}, {s.format}] {s.records} read: {s.bad_lines} bad lines, {s.empty} empty, "
                  f"{s.duplicates} duplicates, "
                  f"{s.too_long} too long -> {s.train} train, {s.val} held out ({s.safety} tagged safety)"
                  for s in all_stats]
        lines.append(f"  total: {len(train)} train ({self.stats['train_safety']} safety), "
                     f"{len(val)} held out ({self.stats['val_safety']} safety)")
        rank_zero_info("\n".join(lines))

    # ----------------------------------------------------------------------------------- loaders
    def _iterations_done(self) -> int:
        # One batch per iteration, so the trainer's count of finished training batches is the
        # iteration about to run; Lightning restores it from the checkpoint on resume.
        assert self.trainer is not None
        return self.start_iteration + int(self.trainer.fit_loop.epoch_loop.batch_progress.total.processed)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        assert self.train_dataset is not None
        num_replicas, rank = self.replicas()
        position = self._iterations_done if self.trainer is not None else None
        sampler = IterationSampler(self.train_dataset, self.batch_size, num_replicas, rank, self.seed, position)
        return DataLoader(self.train_dataset, batch_size=len(sampler), sampler=sampler,
                          num_workers=self.num_workers, collate_fn=collate_prompts)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        assert self.val_dataset is not None
        return DataLoader(self.val_dataset, batch_size=self.val_batch_size, shuffle=False,
                          num_workers=self.num_workers, collate_fn=collate_prompts)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


__all__ = ["PromptDataModule", "PromptDataset", "Prompt", "PromptSource", "IterationSampler", "collate_prompts",
           "parse_prompt_sources", "read_prompt_source", "PROMPT_FORMATS"]


def heldout_hh_prompts(path: str | Path, tokenizer: Tokenizer, max_prompt_len: int, val_fraction: float, seed: int,
                       chat_template: str) -> list[Prompt]:
    """The held-out prompts of an HH file as the RLHF prompt data splits it (by content: the same
    ``val_fraction``, ``seed`` and prompt length bound give the same prompts); the evaluation's prompts, which
    ``llama2-lightning gatt --skip-heldout`` keeps out of its training dialogs."""
    dm = PromptDataModule(sources=[{"path": str(path), "format": "hh", "is_safety": False, "name": "prompts"}],
                          tokenizer_path=str(tokenizer.model_path), max_prompt_len=max_prompt_len,
                          val_fraction=val_fraction, seed=seed, chat_template=chat_template)
    dm.use_tokenizer(tokenizer)
    return dm.heldout_prompts
