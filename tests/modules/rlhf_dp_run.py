"""Two RLHF iterations of ``RLHFModule`` on W CPU processes (FSDP2, ModelParallelStrategy), for
``test_rlhf_data_parallel.py``.

    python tests/modules/rlhf_dp_run.py INIT OUT WORLD ALGORITHM   (ALGORITHM: ppo | rs)

Each iteration's global batch is 7 prompts; with WORLD=2, rank 0 takes prompts 0-2 and rank 1 prompts
3-6: an uneven split, so rank 0 must run padding forwards and micro-batches to keep FSDP's collectives
in step. ``ppo`` decodes greedily, so every process samples the same answers whatever its batch, and
the 2-process run can be compared with the 1-process one on the same global batch; it writes
OUT/rank<r>.json (per prompt index: the per-token rewards, advantages and returns on its answer tokens;
per iteration: the logged statistics) and, from rank 0, OUT/final.pt (the consolidated float32 policy
and value weights). ``rs`` runs rejection sampling with ``train_on: round`` and writes OUT/rank<r>.json
(the prompt indices each rank trained on per round, its optimiser steps) and a sharded checkpoint
OUT/ckpt (a directory of DCP shards + meta.pt).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for paths.py
from paths import TOKENIZER  # noqa: E402

from llama2_lightning.callbacks.ppo import PPOCallback  # noqa: E402
from llama2_lightning.callbacks.rejection_sampling import RejectionSamplingCallback  # noqa: E402
from llama2_lightning.chat import encode_prompt  # noqa: E402
from llama2_lightning.losses import IGNORE_INDEX  # noqa: E402
from llama2_lightning.modules.args import OptimizerArgs, ShardingArgs  # noqa: E402
from llama2_lightning.modules.rlhf import RLHFModule  # noqa: E402
from llama2_lightning.reward_functions import RewardFunction  # noqa: E402
from llama2_lightning.tokenizer import Tokenizer  # noqa: E402

GLOBAL_PROMPTS, ITERATIONS = 7, 2
SHARES = {1: [range(0, 7)], 2: [range(0, 3), range(3, 7)]}
WORDS = ["the king", "the sea", "love", "war", "the night", "my lord", "thy heart", "a rose", "the moon", "gold",
         "a horse", "the crown", "winter", "a sword"]


class IdReward(RewardFunction):
    """A reward that differs between answers (a random tiny model rarely says a target word): the
    mean answer id plus a number from the prompt, scaled."""

    def __call__(self, prompts: Sequence[Any], answers: Sequence[str], prompt_ids: Sequence[Sequence[int]],
                 answer_ids: Sequence[Sequence[int]], is_safety: Tensor) -> Tensor:
        return torch.tensor([(sum(a) / max(len(a), 1) + sum(p) % 97) / 1000.0 for p, a in zip(prompt_ids, answer_ids)],
                            device=is_safety.device)


def batches(tok: Tokenizer) -> list[dict[str, Any]]:
    out = []
    for it in range(ITERATIONS):
        rows = []
        for i in range(GLOBAL_PROMPTS):
            index = it * GLOBAL_PROMPTS + i
            messages = [{"role": "user", "content": f"Tell me of {WORDS[index % len(WORDS)]}, {index}."}]
            rows.append({"prompt_ids": encode_prompt(tok, messages), "messages": messages, "is_safety": False,
                         "index": index})
        out.append(rows)
    return out


def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"prompt_ids": [r["prompt_ids"] for r in rows], "messages": [r["messages"] for r in rows],
            "is_safety": torch.tensor([r["is_safety"] for r in rows]),
            "index": torch.tensor([r["index"] for r in rows], dtype=torch.long)}


class RecordingPPO(PPOCallback):
    def __init__(self, out: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out, self.rows, self.stats = out, {}, []

    def make_experience(self, trainer, module, batch):
        exp = super().make_experience(trainer, module, batch)
        for i, index in enumerate(batch["index"].tolist()):
            m = exp.action_mask[i]
            self.rows[str(index)] = {k: getattr(exp, k)[i][m].tolist() for k in ("rewards", "advantages", "returns")}
        self.stats.append({k: exp.stats[k] for k in ("beta", "reward", "reward_std", "kl", "advantage_mean",
                                                      "response_length")})
        return exp

    def on_train_end(self, trainer, pl_module) -> None:
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"rows": self.rows, "stats": self.stats}))
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = {f"model.{k}": v for k, v in get_model_state_dict(pl_module.model, options=opts).items()}
        state |= {f"value.{k}": v for k, v in get_model_state_dict(pl_module.value_model, options=opts).items()}
        if trainer.is_global_zero:
            torch.save({k: v.float() for k, v in state.items()}, self.out / "final.pt")


class RecordingRS(RejectionSamplingCallback):
    def __init__(self, out: Path, prompts: dict[tuple[int, ...], int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out, self.prompts, self.trained, self.stats = out, prompts, [], []

    @property
    def state_key(self) -> str:  # saved as the real callback's state, which pool_from looks for
        return RejectionSamplingCallback.__qualname__

    def make_experience(self, trainer, module, batch):
        exp = super().make_experience(trainer, module, batch)
        trained = []
        for ids, labels in zip(exp.input_ids.tolist(), exp.labels.tolist()):
            if all(t == IGNORE_INDEX for t in labels):
                continue  # a padding row (more ranks than prompts): trains nothing
            trained += [i for p, i in self.prompts.items() if tuple(ids[: len(p)]) == p]
        self.trained.append(trained)
        self.stats.append({k: exp.stats[k] for k in ("train_rows", "pool_size", "reward", "reward_best_of_k")})
        return exp

    def on_train_end(self, trainer, pl_module) -> None:
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(
            {"trained": self.trained, "stats": self.stats, "optimizer_steps": trainer.global_step}))


def main(init: str, out: str, world: int, algorithm: str = "ppo") -> None:
    L.seed_everything(0)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(TOKENIZER)
    module = RLHFModule(
        init_from=init, reward=IdReward(), max_new_tokens=6, temperature=0.0, rollout_batch_size=2,
        optimizer=OptimizerArgs(lr=1e-3, warmup_steps=0, warmup_ratio=0.0, min_lr_ratio=1.0), value_lr=1e-3,
        minibatch_size=8 if world == 1 else 4,  # one optimiser step per pass: the global minibatch is all 7
        micro_batch_size=2 if world == 1 else 1,  # rank 0 (3 rows) pads a 4th micro-batch, rank 1 has 4
        ppo_epochs=2, sharding=ShardingArgs(param_dtype=None, reduce_dtype="float32", activation_checkpointing=True))
    if algorithm == "ppo":
        callback: L.Callback = RecordingPPO(out_dir, adaptive_kl={"target": 0.001, "horizon": 10}, kl_coef=0.05,
                                            seed=0)
    else:
        prompts = {tuple(r["prompt_ids"]): r["index"] for b in batches(tok) for r in b}
        callback = RecordingRS(out_dir, prompts, num_samples=2, temperature=1.0, train_on="round", seed=0)
    trainer = L.Trainer(
        accelerator="cpu", devices=world, max_epochs=1, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        use_distributed_sampler=False, callbacks=[callback],
        strategy=ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1))

    class Data(L.LightningDataModule):
        tokenizer = tok

        def train_dataloader(self) -> DataLoader:
            share = SHARES[trainer.world_size][trainer.global_rank]
            items = [collate([b[i] for i in share]) for b in batches(tok)]
            return DataLoader(items, batch_size=None)

    trainer.fit(module, datamodule=Data())
    if algorithm == "rs":
        trainer.save_checkpoint(out_dir / "ckpt")  # sharded: a directory of shards + meta.pt


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "ppo")
