"""`llama2-lightning pipeline`: key overrides, validation errors, and the whole recipe end to end with
stages cut to a few steps: each stage's checkpoint is what the next stage starts from, reruns skip
finished stages, --from-stage reruns from one, and the report is drawn from the logged values."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from paths import ROOT

from llama2_lightning.cli import main
from llama2_lightning.pipeline.metrics import read_metrics
from llama2_lightning.pipeline.report import stage_kind
from llama2_lightning.pipeline.run import run_pipeline
from llama2_lightning.pipeline.spec import PipelineError, load_pipeline, set_key, stage_configs


# ------------------------------------------------------------------------------------------ set_key


def test_set_key_paths_list_indices_and_class_selectors() -> None:
    config: dict[str, Any] = {"trainer": {"max_steps": 10, "callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": "a"}},
        {"class_path": "x.RejectionSamplingCallback", "init_args": {"num_samples": 8}}]}}
    set_key(config, "trainer.max_steps", 3)
    set_key(config, "trainer.callbacks.RejectionSamplingCallback.init_args.pool_from", "p.ckpt")  # new leaf
    set_key(config, "trainer.callbacks.0.init_args.dirpath", "b")
    assert config["trainer"]["max_steps"] == 3
    assert config["trainer"]["callbacks"][1]["init_args"] == {"num_samples": 8, "pool_from": "p.ckpt"}
    assert config["trainer"]["callbacks"][0]["init_args"]["dirpath"] == "b"
    with pytest.raises(PipelineError, match=r"'trainer.strategy' is not in the stage config"):
        set_key(config, "trainer.strategy.init_args.x", 1, "f.yaml")
    with pytest.raises(PipelineError, match=r"0 items of class 'EarlyStopping'.*ModelCheckpoint"):
        set_key(config, "trainer.callbacks.EarlyStopping.init_args.patience", 1)
    with pytest.raises(PipelineError, match="index 5 out of range"):
        set_key(config, "trainer.callbacks.5.init_args.x", 1)


def _write(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("stages, match", [
    ([{"name": "a", "config": "configs/sft/nope.yaml"}], r"stage 'a'.config: 'configs/sft/nope.yaml' is not a file"),
    ([{"name": "a", "config": "configs/sft/tiny.yaml", "inputs": {"model.init_args.init_from": "b"}},
      {"name": "b", "config": "configs/pretrain/tiny.yaml"}], r"'b' is not an earlier stage"),
    ([{"name": "a", "config": "configs/sft/tiny.yaml", "sets": {}}], r"unknown key\(s\) \['sets'\]"),
    ([{"name": "a", "config": "configs/sft/tiny.yaml"}, {"name": "a", "config": "configs/sft/tiny.yaml"}],
     "used twice"),
])
def test_bad_pipeline_files_name_the_stage_and_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   stages: list, match: str) -> None:
    monkeypatch.chdir(ROOT)
    path = _write(tmp_path / "p.yaml", {"run_dir": str(tmp_path / "run"), "stages": stages})
    with pytest.raises(PipelineError, match=match) as err:
        load_pipeline(path)
    assert str(path) in str(err.value)


def test_shipped_pipelines_wire_every_input_to_an_earlier_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    for path in sorted((ROOT / "configs" / "pipeline").glob("*.yaml")):
        pipe = load_pipeline(path)
        configs = stage_configs(pipe)  # every `set` and `inputs` key resolves in its stage config
        fits = [s for s in pipe.stages if s.command is None]  # command stages (gatt, evaluate) in between
        names = [s.name for s in fits]
        kinds = [configs[n]["model"]["class_path"].rsplit(".", 1)[-1] for n in names]
        # [pretraining ->] SFT -> both RMs [-> context-distillation SFT] -> RLHF, in that order, each RLHF
        # stage scoring with both RMs
        lm = 2 if kinds[0] == "PretrainModule" else 1  # a real model's pipeline starts from its weights
        assert kinds[:lm + 2] == ["PretrainModule", "SFTModule", "RewardModule", "RewardModule"][2 - lm:], path
        rest = names[lm + 2:]
        cd = rest[:next(k for k, n in enumerate(rest) if kinds[names.index(n)] != "SFTModule")]
        rl = rest[len(cd):]
        assert {kinds[names.index(n)] for n in rl} == {"RLHFModule"}, path
        for prev, stage in zip([names[lm - 1], *cd], cd):  # the distillation SFT goes on from the SFT model
            assert configs[stage]["model"]["init_args"]["init_from"] == str(pipe.output(prev)), f"{path}: {stage}"
        algos = [stage_kind(configs[n]) for n in rl]  # the experience callback decides
        assert algos[:-1] == ["rejection_sampling"] * (len(algos) - 1) and algos[-1] == "ppo"
        for stage in fits:
            assert configs[stage.name]["trainer"]["default_root_dir"] == str(pipe.stage_dir(stage.name))
        for prev, stage in zip([(cd or names[lm - 1:lm])[-1], *rl], rl):
            init = configs[stage]["model"]["init_args"]["init_from"]
            assert init == str(pipe.output(prev)), f"{path}: {stage} must start from {prev}"
        for name in rl:
            reward = configs[name]["model"]["init_args"]["reward"]["init_args"]
            assert reward["helpful_checkpoint"] == str(pipe.output(names[lm]))
            assert reward["safety_checkpoint"] == str(pipe.output(names[lm + 1]))


# ------------------------------------------------------------------------------------ end to end

CSV_ONLY = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
             "init_args": {"save_dir": "${trainer.default_root_dir}", "name": "csv"}}]
PROMPTS = [{"path": "data/preference/hh_helpful_pairs.jsonl.gz", "format": "hh", "is_safety": False,
            "name": "hh_helpful", "limit": 60},
           {"path": "data/preference/hh_harmless_pairs.jsonl.gz", "format": "hh", "is_safety": True,
            "name": "hh_harmless", "limit": 40}]
RLHF_SMALL = {"trainer.max_epochs": 1, "model.init_args.max_new_tokens": 8, "model.init_args.minibatch_size": 4,
              "data.init_args.sources": PROMPTS, "data.init_args.batch_size": 4, "data.init_args.max_val_prompts": 4,
              "data.init_args.val_fraction": 0.1, "data.init_args.max_prompt_len": 96}


def small_pipeline(tmp_path: Path) -> Path:
    """configs/pipeline/tiny.yaml with every stage cut to a couple of steps on the `tiny` preset."""
    raw = yaml.safe_load((ROOT / "configs" / "pipeline" / "tiny.yaml").read_text())
    raw["run_dir"] = str(tmp_path / "run")
    raw["set"] = {"trainer.enable_progress_bar": False, "trainer.enable_model_summary": False,
                  "trainer.logger": CSV_ONLY}
    small: dict[str, dict[str, Any]] = {
        "pretrain": {"model.init_args.model": "tiny", "data.init_args.max_seq_len": 64, "data.init_args.batch_size": 4,
                     "trainer.max_steps": 2, "trainer.val_check_interval": 2, "trainer.limit_val_batches": 1,
                     "trainer.callbacks.ModelCheckpoint.init_args.every_n_train_steps": 2,
                     "trainer.callbacks.GenerationSamples.init_args.every_n_steps": 100},
        "sft": {"trainer.max_steps": 2, "trainer.val_check_interval": 2, "trainer.limit_val_batches": 1, "data.init_args.max_seq_len": 128},
        "rm": {"trainer.max_steps": 2, "trainer.val_check_interval": 2, "trainer.limit_val_batches": 2,
               "data.init_args.max_seq_len": 128},
    }
    for stage in raw["stages"]:
        name = stage["name"]
        if name.startswith("rm-"):
            sources = yaml.safe_load((ROOT / stage["config"]).read_text())["data"]["init_args"]["sources"]
            stage["set"] = {**small["rm"], "data.init_args.sources": [{**s, "limit": 40} for s in sources]}
        elif name.startswith(("rs-", "ppo-")):
            stage["set"] = {**stage.get("set", {}), **RLHF_SMALL}
            if name.startswith("rs-"):
                stage["set"]["trainer.callbacks.RejectionSamplingCallback.init_args.num_samples"] = 2
            else:
                stage["set"].update({"trainer.max_epochs": 2, "trainer.check_val_every_n_epoch": 1})
        else:
            stage["set"] = {**stage.get("set", {}), **small[name]}
    raw["report"].update({"max_prompts": 4, "table_rows": 2, "wandb": False})
    return _write(tmp_path / "small.yaml", raw)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_small_pipeline_hands_each_stage_a_real_checkpoint_and_reports(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    pipe = load_pipeline(small_pipeline(tmp_path))
    lines: list[str] = []
    records = run_pipeline(pipe, print_fn=lines.append)
    names = [s.name for s in pipe.stages]
    assert list(records) == names
    done = [line for line in lines if " done in " in line]
    assert len(done) == len(names) and "val/bpb=" in done[0] and "val/accuracy=" in done[2]
    for name in names:
        rec = json.loads((pipe.stage_dir(name) / "stage.json").read_text())
        assert rec["value"] is not None and math.isfinite(rec["value"]), name
        assert read_metrics(pipe.stage_dir(name)), name  # every stage logged metrics

    out = {n: _state(pipe.output(n)) for n in names}
    # SFT and both RMs trained away from the weights they were handed
    assert not _same(_part(out["sft"], "model."), _part(out["pretrain"], "model."))
    # each RLHF stage's frozen reference pi_0 is exactly the previous stage's policy
    for prev, stage in [("sft", "rs-v1"), ("rs-v1", "rs-v2"), ("rs-v2", "rs-v3"), ("rs-v3", "rs-v4"),
                        ("rs-v4", "ppo-v5")]:
        assert _same(_part(out[stage], "ref_model."), _part(out[prev], "model.")), stage
        assert not _same(_part(out[stage], "model."), _part(out[prev], "model.")), f"{stage} did not train"
    # the SFT stage started from the pretraining output: its config says so and the file is that checkpoint
    sft_cfg = yaml.safe_load((pipe.stage_dir("sft") / "stage-config.yaml").read_text())
    assert sft_cfg["model"]["init_args"]["init_from"] == str(pipe.output("pretrain"))
    # the rejection-sampling pool grows over the rounds (each round's run starts from the previous pool)
    def pool(name: str) -> list:
        callbacks = torch.load(pipe.output(name), map_location="cpu", weights_only=True)["callbacks"]
        return next(v for k, v in callbacks.items() if k.startswith("RejectionSamplingCallback"))["pool"]

    sizes = [len(pool(f"rs-v{i}")) for i in range(1, 5)]
    assert sizes == [4, 8, 12, 16]  # 4 new prompts per round (start_iteration), earlier bests kept

    report = (pipe.run_dir / "report.md").read_text()
    for section in ("## Stages", "## Pretraining and supervised fine-tuning", "## Reward models", "## RLHF rounds",
                    "## The same held-out prompts: sft vs ppo-v5"):
        assert section in report
    for png in ("losses.png", "reward_models.png", "rlhf.png", "heldout.png"):
        assert (pipe.run_dir / png).stat().st_size > 1000
    heldout = json.loads((pipe.run_dir / "heldout.json").read_text())
    assert len(heldout["baseline"]["answers"]) == len(heldout["final"]["answers"]) > 0
    # the report's RM accuracy is the value the RM stage logged
    acc = records["rm-helpful"]["value"]
    assert f"| rm-helpful | {acc:.3f} |" in report

    # a rerun skips every finished stage; --from-stage reruns that stage and the ones after it
    lines.clear()
    run_pipeline(pipe, report=False, print_fn=lines.append)
    assert sum("skipped" in line for line in lines) == len(names)
    # an interrupted stage (checkpoint written, no stage.json) resumes from its checkpoint
    (pipe.stage_dir("ppo-v5") / "stage.json").unlink()
    lines.clear()
    run_pipeline(pipe, report=False, print_fn=lines.append)
    assert any(line.startswith("[9/9] ppo-v5") and "resuming from" in line for line in lines)
    assert "--ckpt_path" in (pipe.stage_dir("ppo-v5") / "stage.log").read_text()
    assert json.loads((pipe.stage_dir("ppo-v5") / "stage.json").read_text())["resumed"] is True
    assert main(["pipeline", "--config", str(pipe.path), "--from-stage", "ppo-v5", "--no-report"]) == 0
    moved = list((pipe.run_dir / ".superseded").glob("*/ppo-v5/checkpoints/last.ckpt"))
    assert len(moved) == 1  # the old run is kept, not deleted
    assert json.loads((pipe.stage_dir("ppo-v5") / "stage.json").read_text())["resumed"] is False
    assert (pipe.stage_dir("rs-v4") / "stage.json").exists()  # earlier stages untouched
