"""Rejection-sampling fine-tuning (Touvron et al. 2023, section 3.2.3).

One round: ``make_experience`` (numbered steps below) samples K answers per prompt from the
*latest* policy, keeps each prompt's best and pools it with the best answers of all earlier rounds:
the paper first fine-tuned on the last round's samples only and saw regressions (e.g. forgotten
rhyming skills); taking the top samples of all prior iterations fixed them. The pool comes back as a
:class:`~llama2_lightning.rlhf.experience.SFTExperience`, on which ``RLHFModule.sft_update``
fine-tunes (answer-only NLL).

Temperature: the paper finds the best temperature rises as the model improves (1.2-1.3 for 10-100
samples at later stages), so it can rise by round: an explicit ``temperatures`` list (the last value
repeats), or ``temperature + round * temperature_increment`` capped at ``max_temperature``.

Rounds as separate runs (the paper's RLHF-V1..V4): ``pool_from`` names the previous round's
checkpoint; a fresh run starts from its pool and round counter, so the temperature keeps rising and
the pool keeps the best answers of *all* earlier rounds. Set the prompt data's ``start_iteration`` to
the iterations already done so the new round draws new prompts. Resuming a killed run
(``--ckpt_path``) restores its own state instead.

Distributed: every data-parallel replica's new best answers are gathered (over the data-parallel
group only: the ranks of a tensor-parallel group hold the same rows), so all ranks hold the same pool
and each trains on a strided share of it (``train_on: round``: of every replica's prompts of this
round). The shares can differ by a row; ``RLHFModule`` gives every rank the same number of
micro-batches and optimiser steps (padding batches weigh 0), so no rank waits in a collective the
others never join. The logged reward and lengths are means over every replica's rollouts. State (``state_dict``): the round counter (it seeds sampling and the
minibatch order) and the pool, so a resumed run continues with the same pool.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from llama2_lightning.checkpoint.lightning import read_checkpoint_state
from llama2_lightning.losses import IGNORE_INDEX
from llama2_lightning.rlhf.experience import ExperienceCallback, RolloutSource, SFTExperience, iteration_seed
from llama2_lightning.rlhf.global_stats import global_means
from llama2_lightning.tensor_parallel import data_parallel_group, data_parallel_rank, data_parallel_size


class RejectionSamplingCallback(ExperienceCallback):
    """Best-of-K samples, pooled over rounds, as the module's fine-tuning data (module docstring); its
    presence makes the run rejection sampling.

    Args:
        num_samples: K answers per prompt (paper: up to 10-100 with the 70B model).
        temperatures: per-round temperatures; overrides ``temperature`` / ``temperature_increment``.
        temperature / temperature_increment / max_temperature: the round-r temperature
            ``min(temperature + r * temperature_increment, max_temperature)``.
        train_on: ``"pool"`` fine-tunes on every prompt's best answer so far (paper's fix);
            ``"round"`` only on this round's prompts (every replica's), each with its best answer over all rounds.
        seed: base of the sampling and minibatch seeds.
        pool_from: a previous rejection-sampling run's Lightning checkpoint (a ``.ckpt`` file or a sharded
            checkpoint directory): this run starts with its pool and round counter (module docstring,
            "Rounds").
    """

    def __init__(self, num_samples: int = 4, temperatures: list[float] | None = None, temperature: float = 1.0,
                 temperature_increment: float = 0.0, max_temperature: float | None = None,
                 train_on: Literal["pool", "round"] = "pool", seed: int = 0, pool_from: str | None = None) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if temperatures is not None and (not temperatures or min(temperatures) <= 0):
            raise ValueError(f"temperatures must be a non-empty list of values > 0, got {temperatures}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 (rejection sampling needs distinct samples), got {temperature}")
        if train_on not in ("pool", "round"):
            raise ValueError(f"train_on {train_on!r}; allowed: pool, round")
        self.num_samples = num_samples
        # the schedule: an explicit list, else min(temperature + round * increment, max_temperature)
        self.temperatures = list(temperatures) if temperatures is not None else None
        self.temperature, self.temperature_increment, self.max_temperature = (temperature, temperature_increment,
                                                                               max_temperature)
        self.train_on = train_on
        self.seed = seed
        self.pool_from = pool_from
        self.round = 0
        # prompt index -> {"prompt_ids", "answer_ids", "reward", "round"}
        self.pool: dict[int, dict[str, Any]] = {}

    def temperature_for(self, round_: int) -> float:
        if self.temperatures is not None:
            return float(self.temperatures[min(round_, len(self.temperatures) - 1)])
        t = self.temperature + round_ * self.temperature_increment
        return float(min(t, self.max_temperature) if self.max_temperature is not None else t)

    @staticmethod
    def _gather(entries: list[tuple[int, dict[str, Any]]], group: Any = None) -> list[tuple[int, dict[str, Any]]]:
        """Every data-parallel replica's ``entries``, in rank order (``group``: the data-parallel group)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return entries
        gathered: list[Any] = [None] * torch.distributed.get_world_size(group)
        torch.distributed.all_gather_object(gathered, entries, group=group)
        return [e for part in gathered for e in part]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # setup runs before Lightning restores a resumed run's callback state, which then wins.
        if stage == "fit" and self.pool_from is not None:
            self.load_state_dict(pool_state_from_checkpoint(self.pool_from))

    def make_experience(self, trainer: L.Trainer, module: RolloutSource, batch: dict[str, Any]) -> SFTExperience:
        K = self.num_samples
        temperature = self.temperature_for(self.round)
        seed = iteration_seed(self.seed, self.round, data_parallel_rank(trainer))
        # 1. sample K answers per prompt from the latest policy, at this round's temperature
        t0 = time.perf_counter()
        rollout = module.rollout(batch, seed=seed, temperature=temperature, num_samples=K)
        # 2. score them and keep each prompt's best
        t1 = time.perf_counter()
        reward = module.score(rollout)["reward"].view(-1, K)  # (B, K)
        t2 = time.perf_counter()
        new: list[tuple[int, dict[str, Any]]] = []
        for i, k in enumerate(reward.argmax(dim=1).tolist()):
            row = i * K + k
            new.append((int(batch["index"][i]), {"prompt_ids": list(rollout.prompt_ids[row]),
                                                 "answer_ids": list(rollout.answer_ids[row]),
                                                 "reward": float(reward[i, k]), "round": self.round}))
        # 3. pool: per prompt, the best answer over every round so far (every replica's new bests)
        group = data_parallel_group(trainer)
        everyone = self._gather(new, group)
        improved = 0
        for index, entry in everyone:
            old = self.pool.get(index)
            if old is not None and old["prompt_ids"] != entry["prompt_ids"]:
                raise ValueError(f"rejection-sampling pool entry {index} holds another prompt than the data's prompt "
                                 f"{index}: the checkpoint's pool came from a different prompt set")
            if old is None or entry["reward"] > old["reward"]:
                improved += old is not None
                self.pool[index] = entry
        # 4. this rank's strided share of the pool (or of this round's prompts, every replica's) as SFT samples;
        #    one share per data-parallel replica: the ranks of a tensor-parallel group train on the same one
        keys = sorted(self.pool) if self.train_on == "pool" else sorted({i for i, _ in everyone})
        share = keys[data_parallel_rank(trainer)::data_parallel_size(trainer)]
        # more replicas than prompts: this rank still runs the others' forward/backward calls, on a row
        # that weighs nothing (its labels are cleared below)
        chosen = [self.pool[k] for k in share or keys[:1]]
        means = global_means({"reward": reward,  # all K samples: the policy's own average
                              "reward_best_of_k": reward.max(dim=1).values,
                              "response_length": rollout.answer_lengths.float()}, group)
        stats = {
            **means,
            "reward_pool": sum(e["reward"] for e in self.pool.values()) / len(self.pool),
            "pool_size": float(len(self.pool)),
            "pool_improved": float(improved),
            "train_rows": float(len(keys)),
            "temperature": temperature,
            "round": float(self.round),
            "time/generation_s": t1 - t0,
            "time/scoring_s": t2 - t1,
        }
        exp = SFTExperience.from_pairs([e["prompt_ids"] for e in chosen], [e["answer_ids"] for e in chosen],
                                       module.tokenizer.pad_id, seed=seed, stats=stats)
        if not share:
            exp.labels.fill_(IGNORE_INDEX)
        return exp

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.round += 1

    def state_dict(self) -> dict[str, Any]:
        # Plain lists and numbers: checkpoints load with weights_only=True.
        return {"round": self.round, "pool": [{"index": k, **v} for k, v in sorted(self.pool.items())]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.round = int(state_dict["round"])
        self.pool = {int(e["index"]): {k: v for k, v in e.items() if k != "index"} for e in state_dict["pool"]}


def pool_state_from_checkpoint(path: str | Path) -> dict[str, Any]:
    """The ``RejectionSamplingCallback`` state (round counter and pool) saved in a Lightning checkpoint:
    a ``.ckpt`` file or a sharded directory (``ModelParallelStrategy``; the state is in its ``meta.pt``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"pool_from={str(path)!r}: no such checkpoint (the previous rejection-sampling "
                                "round's checkpoints/last.ckpt: a file, or a directory when sharded)")
    ckpt = read_checkpoint_state(path)  # errors name the path: empty, truncated, foreign, crafted
    states = [v for k, v in (ckpt.get("callbacks") or {}).items()
              if str(k).startswith(RejectionSamplingCallback.__name__)]
    if len(states) != 1:
        raise ValueError(f"pool_from={str(path)!r}: expected one {RejectionSamplingCallback.__name__} state in the "
                         f"checkpoint's callbacks, found {len(states)} (was it written by a rejection-sampling run?)")
    return states[0]


__all__ = ["RejectionSamplingCallback", "pool_state_from_checkpoint"]
