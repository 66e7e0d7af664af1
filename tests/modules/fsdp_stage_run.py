"""Train one stage's module a few steps with the big configs' strategy block (FSDP2 over W CPU processes,
bf16 compute, activation checkpointing, float32 gradient reduction), for the parity tests in
``test_fsdp_stages.py``. Run as a script; Lightning launches the other ranks by re-running it.

    python tests/fsdp_stage_run.py STAGE INIT OUT WORLD MAX_STEPS [RESUME_CKPT|""] [PARAM_DTYPE] [TRAINABLE_BLOCKS]

Every step uses the same global batch whatever WORLD is: rank r takes rows r*G/W .. (r+1)*G/W - 1 of it,
and every rank's share has the same number of loss terms (answer tokens, pairs), so the data-parallel
mean of the per-rank losses is the 1-process loss. Writes OUT/losses.json (every step's loss averaged
over ranks), OUT/final.pt (the consolidated float32 weights, rank 0) and a sharded checkpoint OUT/ckpt.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.utils.data import DataLoader, Dataset

from llama2_lightning.modules import PretrainModule, RewardModule, SFTModule
from llama2_lightning.modules.args import FinetuneArgs, OptimizerArgs, ShardingArgs

GLOBAL_ROWS, T, VOCAB, STEPS = 4, 32, 2048, 8
STRATEGY = dict(param_dtype="bfloat16", reduce_dtype="float32", activation_checkpointing=True)


def _batches(stage: str) -> list[dict | tuple]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        x = torch.randint(3, VOCAB, (GLOBAL_ROWS, T), generator=g)  # (G, T)
        if stage == "pretrain":
            out.append((x[:, :-1], x[:, 1:]))
        elif stage == "sft":
            labels = x.clone()
            # rows 0, 1 (rank 0 of 2) and 2, 3 (rank 1) answer 10 + 14 tokens each: equal loss terms per rank
            for row, start in enumerate((T - 10, T - 14, T - 14, T - 10)):
                labels[row, :start] = -100
            out.append({"input_ids": x, "labels": labels})
        else:  # reward: G / 2 pairs, chosen rows then rejected rows of each rank's share
            out.append({"input_ids": x, "attention_mask": torch.ones_like(x, dtype=torch.bool)})
    return out


class RankShare(Dataset):
    """Step i's rows of this rank, from step ``start`` on: one batch per item (the loader's batch_size is
    None)."""

    def __init__(self, stage: str, rank: int, world: int, start: int = 0) -> None:
        self.stage, self.items = stage, []
        per = GLOBAL_ROWS // world
        for b in _batches(stage)[start:]:  # a resumed run continues with the next step's batch
            rows = slice(rank * per, (rank + 1) * per)
            if stage == "pretrain":
                self.items.append((b[0][rows], b[1][rows]))
            elif stage == "sft":
                self.items.append({k: v[rows] for k, v in b.items()})
            else:
                pairs = GLOBAL_ROWS // 2  # pair p: chosen row p, rejected row G/2 + p
                mine = list(range(rank * pairs // world, (rank + 1) * pairs // world))
                idx = mine + [pairs + p for p in mine]
                self.items.append({"input_ids": b["input_ids"][idx], "attention_mask": b["attention_mask"][idx],
                                   "margin_label": [None] * len(mine)})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class Recorder(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.losses = out, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"].detach().float().clone()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(loss)
            loss /= torch.distributed.get_world_size()
        self.losses.append(float(loss))

    def on_train_end(self, trainer, module) -> None:
        state = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if trainer.is_global_zero:
            (self.out / "losses.json").write_text(json.dumps(self.losses))
            torch.save({k: v.float() for k, v in state.items()}, self.out / "final.pt")
            dtypes = sorted({str(p.dtype) for p in module.model.parameters()})
            (self.out / "master_dtypes.json").write_text(json.dumps(dtypes))


def main(stage: str, init: str, out: str, world: int, max_steps: int, resume: str | None = None,
         param_dtype: str = "bfloat16", trainable_blocks: int | None = None) -> None:
    L.seed_everything(0)
    cls = {"pretrain": PretrainModule, "sft": SFTModule, "reward": RewardModule}[stage]
    # a constant learning rate: the schedule must not depend on max_steps, which differs on resume
    # pretraining trains every weight (no finetune group); SFT and RM may train only the top blocks
    extra = {} if stage == "pretrain" else {"finetune": FinetuneArgs(trainable_blocks=trainable_blocks)}
    module = cls(init_from=init, model="tiny",
                 optimizer=OptimizerArgs(lr=1e-3, warmup_steps=0, warmup_ratio=0.0, min_lr_ratio=1.0),
                 sharding=ShardingArgs(**{**STRATEGY, "param_dtype": param_dtype}), **extra)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = L.Trainer(
        accelerator="cpu", devices=world, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        use_distributed_sampler=False, callbacks=[Recorder(out_dir)],
        strategy=ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1),
    )

    class Data(L.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            share = RankShare(stage, trainer.global_rank, trainer.world_size, trainer.global_step)
            return DataLoader(share, batch_size=None)

    trainer.fit(module, datamodule=Data(), ckpt_path=resume)
    trainer.save_checkpoint(out_dir / "ckpt")  # a directory of shards + meta.pt


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], a[2], int(a[3]), int(a[4]), (a[5] or None) if len(a) > 5 else None,
         a[6] if len(a) > 6 else "bfloat16", int(a[7]) if len(a) > 7 else None)
