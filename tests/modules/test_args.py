"""The grouped module arguments: nested in YAML over each module's defaults, plain data in checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from paths import ROOT

from llama2_lightning.cli import lightning_cli
from llama2_lightning.modules import PretrainModule, RLHFModule, SFTModule
from llama2_lightning.modules.args import OptimizerArgs, ShardingArgs, as_args
from llama2_lightning.reward_functions import LengthRuleReward

ON_ONE_CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.strategy=auto"]


def test_a_yaml_group_sets_its_keys_and_keeps_the_modules_other_defaults(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the tiny SFT config's data paths
    raw = yaml.safe_load((ROOT / "configs/sft/tiny.yaml").read_text())
    raw["model"]["init_args"] = {"model": "tiny", "optimizer": {"lr": 1.0e-3, "betas": [0.8, 0.9]},
                                 "sharding": {"param_dtype": "bfloat16"}}
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump(raw))
    cli = lightning_cli(["--config", str(config), *ON_ONE_CPU, f"--trainer.default_root_dir={tmp_path}",
                         "--model.init_args.optimizer.eps=1e-8"], run=False)
    opt, sharding = cli.model.optimizer_args, cli.model.sharding
    assert (opt.lr, opt.betas, opt.eps) == (1e-3, (0.8, 0.9), 1e-8)  # the YAML's and the command line's
    assert opt.warmup_steps == 10 and opt.min_lr_ratio == 0.1  # SFTModule's own defaults, not the class's
    assert sharding == ShardingArgs(param_dtype="bfloat16")
    # in hyperparameters (and so in checkpoints) the groups are plain dicts
    assert cli.model.hparams.optimizer == {**vars(opt)} and isinstance(cli.model.hparams.sharding, dict)


def test_a_mistyped_group_key_is_refused_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        lightning_cli(["--config", str(ROOT / "configs/sft/tiny.yaml"), *ON_ONE_CPU,
                       "--model.init_args.optimizer.warmup_stepz=3"], run=False)
    assert "warmup_stepz" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"unknown keys \['lrr'\]"):
        as_args(OptimizerArgs, {"lrr": 1.0}, OptimizerArgs())
    with pytest.raises(ValueError, match="min_lr_ratio must be in"):
        OptimizerArgs(min_lr_ratio=2.0)


def test_checkpoint_hyperparameters_load_with_weights_only_and_rebuild_the_module(tmp_path: Path) -> None:
    module = PretrainModule(model="tiny", optimizer=OptimizerArgs(lr=1e-3, warmup_steps=7),
                            sharding=ShardingArgs(activation_checkpointing=True))
    path = tmp_path / "hp.pt"
    torch.save({"hyper_parameters": dict(module.hparams)}, path)
    hparams = torch.load(path, weights_only=True)["hyper_parameters"]  # no dataclass to unpickle
    again = PretrainModule(**hparams)
    assert again.optimizer_args == module.optimizer_args and again.sharding == module.sharding


def test_warmup_is_the_larger_of_steps_and_ratio() -> None:
    args = OptimizerArgs(warmup_steps=5, warmup_ratio=0.03)
    assert [args.warmup_for(n) for n in (10, 100, 167, 1000)] == [5, 5, 6, 30]
    assert OptimizerArgs(warmup_steps=2000).warmup_for(10) == 2000


def test_rlhf_learning_rate_is_constant_unless_asked(tmp_path: Path) -> None:
    def lrs(module: RLHFModule, steps: int) -> list[float]:
        module.configure_model()
        sched = module.configure_optimizers()["lr_scheduler"]["scheduler"]
        out = []
        for _ in range(steps):
            out.append(sched.get_last_lr()[0])
            sched.optimizer.step()
            sched.step()
        return out

    reward = LengthRuleReward(target_length=4)
    assert lrs(RLHFModule(model="tiny", reward=reward), 3) == [1e-6] * 3  # paper, PPO: constant
    warm = RLHFModule(model="tiny", reward=reward, optimizer=OptimizerArgs(lr=1e-4, warmup_steps=2))
    assert lrs(warm, 4) == pytest.approx([5e-5, 1e-4, 1e-4, 1e-4])  # warm-up, then flat without decay_steps
    decay = RLHFModule(model="tiny", reward=reward, optimizer=OptimizerArgs(lr=1e-4, decay_steps=2, min_lr_ratio=0.5))
    assert lrs(decay, 4) == pytest.approx([1e-4, 7.5e-5, 5e-5, 5e-5])
    assert SFTModule(model="tiny").optimizer_args.lr == 2e-5
