"""PPO under the big configs' strategy block (issue 15): FSDP2 over 2 gloo processes, bf16 compute,
activation checkpointing, float32 gradient reduction; a sharded checkpoint, and a resume from it."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from paths import ROOT, TOKENIZER

from llama2_lightning import Transformer
from llama2_lightning.checkpoint import load_checkpoint


@pytest.mark.slow
def test_ppo_bf16_two_processes_checkpoint_and_resume(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Transformer.from_name("tiny").to(torch.bfloat16)  # released weights are bf16
    init = tmp_path / "sft.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "llama_config": model.config.to_dict()}, init)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "Tell me of {w}."}}\n' for w in
                               ["the king", "the sea", "love", "war", "the night", "my lord", "thy heart", "a rose"] * 2))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def fit(epochs: int, *extra: str) -> None:
        proc = subprocess.run(
            [sys.executable, "-m", "llama2_lightning.cli", "fit", "--config",
             str(ROOT / "configs/rlhf/tiny-ppo-rule.yaml"), f"--model.init_args.init_from={init}",
             "--trainer.devices=2", "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
             "--trainer.strategy.data_parallel_size=2", "--trainer.strategy.tensor_parallel_size=1",
             # the strategy block of configs/rlhf/llama2-*-ppo.yaml
             "--model.init_args.sharding.param_dtype=bfloat16", "--model.init_args.sharding.reduce_dtype=float32",
             "--model.init_args.sharding.activation_checkpointing=true",
             f"--trainer.max_epochs={epochs}", "--trainer.check_val_every_n_epoch=2",
             f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
             f"--trainer.logger.save_dir={tmp_path / 'logs'}",
             f"--data.init_args.sources=[{{path: {prompts}, format: prompts}}]", "--data.init_args.batch_size=8",
             "--data.init_args.val_fraction=0.25", f"--data.init_args.tokenizer_path={TOKENIZER}",
             "--model.init_args.max_new_tokens=8", "--model.init_args.minibatch_size=2",
             "--trainer.enable_progress_bar=false", *extra],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]

    fit(2)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last.resolve() / "meta.pt").is_file()  # sharded: a directory of shards
    fit(3, f"--ckpt_path={last}")
    rows = []
    for metrics in sorted((tmp_path / "logs").glob("lightning_logs/version_*/metrics.csv")):
        rows += [r for r in csv.DictReader(open(metrics)) if r.get("train/policy_loss")]
    assert len(rows) == 3  # two iterations, then the third after resuming
    assert all(math.isfinite(float(r["train/loss"])) for r in rows)
    config, state = load_checkpoint(last)  # consolidated from the shards
    assert state["output.weight"].dtype == torch.float32  # float32 master weights from a bf16 checkpoint
    assert not torch.equal(state["output.weight"], model.output.weight.float())  # and they trained
