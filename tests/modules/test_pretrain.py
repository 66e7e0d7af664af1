"""Pretraining stage: every config instantiates, tiny runs train, resume is exact, FSDP2 matches."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from paths import ROOT

from llama2_lightning import LlamaConfig, Transformer
from llama2_lightning.checkpoint import save_hf
from llama2_lightning.cli import lightning_cli

CONFIGS = sorted((ROOT / "configs" / "pretrain").glob("*.yaml"))
PAPER_COUNTS = {"llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320, "llama2-70b": 68_976_648_192}
ON_ONE_CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.strategy=auto"]


def test_configs_exist() -> None:
    names = {p.stem for p in CONFIGS}
    assert {"tiny", "tiny-fsdp", "llama2-7b", "llama2-13b", "llama2-70b"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_instantiates(path: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    cli = lightning_cli(["--config", str(path), *ON_ONE_CPU, f"--trainer.default_root_dir={tmp_path}"], run=False)
    module = cli.model
    preset = raw["model"]["init_args"]["model"]
    assert module.config == LlamaConfig.from_name(preset, **(raw["model"]["init_args"].get("model_overrides") or {}))
    hp = module.optimizer_args
    assert tuple(hp.betas) == (0.9, 0.95) and hp.eps == 1e-5 and hp.weight_decay == 0.1 and hp.min_lr_ratio == 0.1
    assert raw["trainer"]["gradient_clip_val"] == 1.0
    # ${trainer.default_root_dir} interpolation follows the command-line override
    ckpt = [c for c in cli.trainer.callbacks if type(c).__name__ == "ModelCheckpoint"]
    assert ckpt and Path(ckpt[0].dirpath) == tmp_path / "checkpoints"
    if preset in PAPER_COUNTS:
        with torch.device("meta"):
            module.configure_model()
        assert module.model.num_parameters() == PAPER_COUNTS[preset]
        assert hp.warmup_steps == 2000 and hp.lr == (1.5e-4 if preset == "llama2-70b" else 3e-4)
        t = raw["trainer"]
        mesh = t["strategy"]["init_args"]
        # the ranks of a tensor-parallel group read the same batch: data-parallel replicas count
        assert mesh["data_parallel_size"] * mesh["tensor_parallel_size"] == t["num_nodes"] * t["devices"]
        assert mesh["tensor_parallel_size"] == (8 if preset == "llama2-70b" else 1)
        tokens = mesh["data_parallel_size"] * raw["data"]["init_args"]["batch_size"] \
            * t["accumulate_grad_batches"] * raw["data"]["init_args"]["max_seq_len"]
        assert raw["data"]["init_args"]["max_seq_len"] == 4096
        assert 3.9e6 < tokens < 4.3e6  # paper: ~4M tokens per batch
        assert module.sharding.param_dtype == "bfloat16" and module.sharding.activation_checkpointing


def _tiny_overrides(tmp_path: Path, steps: int) -> list[str]:
    return [
        "--model.init_args.model=tiny", "--data.init_args.max_seq_len=32", "--data.init_args.batch_size=4",
        f"--data.init_args.cache_dir={tmp_path / 'cache'}", f"--trainer.default_root_dir={tmp_path / 'run'}",
        f"--trainer.max_steps={steps}", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path / 'logs'}",
        "--model.init_args.optimizer.warmup_steps=2", "--trainer.enable_progress_bar=false",
    ]


def test_tiny_config_fast_dev_run(tmp_path: Path) -> None:
    cli = lightning_cli(["fit", "--config", str(ROOT / "configs/pretrain/tiny.yaml"), "--trainer.fast_dev_run=2",
                         f"--data.init_args.cache_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.global_step == 2
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    assert cli.model.config.vocab_size == cli.datamodule.vocab_size == 2048


def _losses(out: Path) -> list[float]:
    return json.loads((out / "rank0.json").read_text())["losses"]


def test_resume_from_last_checkpoint_continues_exactly(tmp_path: Path) -> None:
    from recorder import Interrupted

    # tiny.yaml with a checkpoint every 3 steps
    raw = yaml.safe_load((ROOT / "configs/pretrain/tiny.yaml").read_text())
    [ckpt] = [c for c in raw["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    ckpt["init_args"]["every_n_train_steps"] = 3
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    record = lambda d: ["--trainer.callbacks+=recorder.Recorder", f"--trainer.callbacks.out_dir={d}"]  # noqa: E731
    # uninterrupted: 6 steps
    a = tmp_path / "a"
    lightning_cli(["fit", "--config", str(config), *_tiny_overrides(a, 6), *record(a / "rec")])
    full = _losses(a / "rec")
    assert len(full) == 6
    # the same run crashes after its first checkpoint (step 3) ...
    b = tmp_path / "b"
    with pytest.raises(Interrupted):
        lightning_cli(["fit", "--config", str(config), *_tiny_overrides(b, 6), *record(b / "rec1"),
                       "--trainer.callbacks+=recorder.Interrupt", "--trainer.callbacks.at_step=3"])
    assert (b / "run" / "checkpoints" / "last.ckpt").is_file()
    # ... and is resumed with --ckpt_path last
    lightning_cli(["fit", "--config", str(config), *_tiny_overrides(b, 6), *record(b / "rec2"), "--ckpt_path=last"])
    resumed = _losses(b / "rec2")
    assert resumed == full[3:], "the resumed run must see the same batches and weights as the uninterrupted one"


@pytest.mark.slow
def test_fsdp_two_processes_hold_half_and_match_single_process(tmp_path: Path) -> None:
    torch.manual_seed(0)
    init = tmp_path / "init"
    model = Transformer.from_name("tiny")
    save_hf(model.config, model.state_dict(), init)
    common = [
        "--model.init_args.model=tiny", f"--model.init_args.init_from={init}", "--data.init_args.max_seq_len=32",
        f"--data.init_args.cache_dir={tmp_path / 'cache'}", "--trainer.max_steps=3", "--trainer.limit_val_batches=0",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path / 'logs'}",
        "--trainer.enable_progress_bar=false", "--model.init_args.optimizer.warmup_steps=2",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "llama2_lightning.cli", "fit", "--config", str(ROOT / "configs/pretrain/tiny-fsdp.yaml"),
         *common, "--data.init_args.batch_size=2", f"--trainer.default_root_dir={tmp_path / 'fsdp'}",
         "--trainer.callbacks+=recorder.Recorder", f"--trainer.callbacks.out_dir={tmp_path / 'fsdp_rec'}",
         # sampling from the sharded model mid-run (all ranks generate, rank 0 prints) must not hang or fail
         "--trainer.callbacks+=llama2_lightning.callbacks.GenerationSamples", "--trainer.callbacks.every_n_steps=2",
         "--trainer.callbacks.max_new_tokens=4"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("[step 2] ") == 2 and proc.stdout.count("[step 3] ") == 2  # 2 prompts, at step 2 and end
    ranks = [json.loads((tmp_path / "fsdp_rec" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["world_size"] == 2 and rank["sharded"]
        assert abs(rank["local_numel"] - rank["total_numel"] / 2) <= 0.01 * rank["total_numel"]
    # a sharded checkpoint was written and consolidates
    assert (tmp_path / "fsdp" / "checkpoints" / "last.ckpt" / "meta.pt").is_file()
    from llama2_lightning.checkpoint import load_lightning

    config, state = load_lightning(tmp_path / "fsdp" / "checkpoints" / "last.ckpt")
    assert config == LlamaConfig.from_name("tiny") and sum(t.numel() for t in state.values()) == ranks[0]["total_numel"]

    lightning_cli(["fit", "--config", str(ROOT / "configs/pretrain/tiny.yaml"), *common,
                   "--data.init_args.batch_size=4", f"--trainer.default_root_dir={tmp_path / 'single'}",
                   "--trainer.callbacks+=recorder.Recorder", f"--trainer.callbacks.out_dir={tmp_path / 'single_rec'}"])
    single = json.loads((tmp_path / "single_rec" / "rank0.json").read_text())["losses"]
    sharded_mean = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    assert len(single) == len(sharded_mean) == 3
    torch.testing.assert_close(torch.tensor(sharded_mean), torch.tensor(single), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_fsdp_run_killed_after_a_sharded_checkpoint_resumes_exactly(tmp_path: Path) -> None:
    """Two processes, FSDP2: a crash after the step-2 sharded checkpoint, then --ckpt_path last, gives
    every rank the same later losses as the uninterrupted sharded run."""
    torch.manual_seed(0)
    init = tmp_path / "init"
    model = Transformer.from_name("tiny")
    save_hf(model.config, model.state_dict(), init)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    raw = yaml.safe_load((ROOT / "configs/pretrain/tiny-fsdp.yaml").read_text())
    [ckpt] = [c for c in raw["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    ckpt["init_args"]["every_n_train_steps"] = 2  # a sharded checkpoint at steps 2 and 4
    config = tmp_path / "tiny-fsdp.yaml"
    config.write_text(yaml.safe_dump(raw))

    def run(name: str, rec: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "llama2_lightning.cli", "fit", "--config", str(config),
             "--model.init_args.model=tiny", f"--model.init_args.init_from={init}", "--data.init_args.max_seq_len=32",
             f"--data.init_args.cache_dir={tmp_path / 'cache'}", "--data.init_args.batch_size=2",
             "--trainer.max_steps=4", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
             "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path / name}",
             "--model.init_args.optimizer.warmup_steps=2", f"--trainer.default_root_dir={tmp_path / name}",
             "--trainer.callbacks+=recorder.Recorder", f"--trainer.callbacks.out_dir={tmp_path / rec}", *extra],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    full = run("a", "a_rec")
    assert full.returncode == 0, full.stderr[-4000:]
    crashed = run("b", "b_rec1", "--trainer.callbacks+=recorder.Interrupt", "--trainer.callbacks.at_step=2")
    assert crashed.returncode != 0 and "interrupted at step 2" in crashed.stderr
    assert (tmp_path / "b" / "checkpoints" / "last.ckpt" / "meta.pt").is_file()  # sharded: a directory
    resumed = run("b", "b_rec2", "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    for rank in (0, 1):
        a = json.loads((tmp_path / "a_rec" / f"rank{rank}.json").read_text())["losses"]
        b = json.loads((tmp_path / "b_rec2" / f"rank{rank}.json").read_text())["losses"]
        assert len(a) == 4 and b == a[2:], f"rank {rank}: the resumed run must continue with the same losses"
