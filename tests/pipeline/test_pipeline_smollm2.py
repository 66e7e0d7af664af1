"""configs/pipeline/smollm2-135m.yaml: command stages (gatt, evaluate) in the pipeline file, and the whole
real-model recipe cut to a few steps on a tiny random model in a GGUF with its own BPE vocabulary and ChatML
template (tests/tiny_gguf.py): every stage hands a real checkpoint (or dialog file) to the next, and
report.md has every evaluation section."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from paths import ROOT
from tiny_gguf import write_tiny_gguf

from llama2_lightning.checkpoint import load_checkpoint
from llama2_lightning.commands.pipeline import check_stage_configs
from llama2_lightning.pipeline.run import run_pipeline
from llama2_lightning.pipeline.spec import PipelineError, command_argv, load_pipeline, stage_configs

SMOLLM2 = ROOT / "configs" / "pipeline" / "smollm2-135m.yaml"
GGUF = "models/SmolLM2-135M-Instruct.Q4_1.gguf"


def _write(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------ command stages


def test_command_stage_options_inputs_and_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    path = _write(tmp_path / "p.yaml", {"run_dir": str(tmp_path / "run"), "stages": [
        {"name": "sft", "config": "configs/sft/tiny.yaml"},
        {"name": "ev", "command": "evaluate", "inputs": {"checkpoint": "sft"},
         "args": {"xstest-limit": 3, "temperature": 0.0, "chat-template": "model", "name": None,
                  "gatt-instructions": "capitals,short"}},
        {"name": "g", "command": "gatt", "inputs": {"checkpoint": "sft"},
         "args": {"input": "x.jsonl", "require-check": True, "placement": False}}]})
    pipe = load_pipeline(path)
    ev = pipe.stage("ev")
    assert ev.config is None and ev.checkpoint == "evaluation.json" and pipe.output("g").name == "dialogs.jsonl"
    argv = command_argv(pipe, ev, check_inputs=False)
    assert argv == ["--xstest-limit", "3", "--temperature", "0.0", "--chat-template", "model",
                    "--gatt-instructions", "capitals,short", "--checkpoint", str(pipe.output("sft")),
                    "--output", str(tmp_path / "run" / "ev" / "evaluation.json")]  # null: not passed
    assert command_argv(pipe, pipe.stage("g"), check_inputs=False)[:3] == ["--input", "x.jsonl", "--require-check"]
    with pytest.raises(PipelineError, match=r"stage 'ev': input --checkpoint <- stage 'sft'.*does not exist"):
        command_argv(pipe, ev)
    configs = stage_configs(pipe)
    assert configs["ev"]["command"] == "evaluate" and configs["ev"]["argv"] == argv
    # the command's own parser checks the options: a typo fails before any stage runs
    check_stage_configs(pipe, {"ev": configs["ev"], "g": configs["g"]})
    pipe.stage("ev").args["gatt-dialogz"] = 2
    with pytest.raises(PipelineError, match=r"stage 'ev' \(llama2-lightning evaluate\): its args do not parse: "
                                            r".*unrecognized arguments: --gatt-dialogz 2"):
        check_stage_configs(pipe, {"ev": stage_configs(pipe)["ev"]})


@pytest.mark.parametrize("stage, match", [
    ({"name": "c", "command": "convert"}, r"stage 'c'.command: 'convert' is not a command a stage can run; "
                                          r"allowed: gatt, distill, evaluate"),
    ({"name": "c", "command": "gatt", "set": {"a": 1}}, r"stage 'c'.set: a command stage \(gatt\) takes 'args'"),
    ({"name": "c", "command": "gatt", "config": "configs/sft/tiny.yaml"}, r"stage 'c'.config: a command stage"),
    ({"name": "c", "command": "gatt", "args": {"--input": "x"}}, r"'--input' is not an option of `gatt`"),
    ({"name": "c", "command": "gatt", "args": {"output": "x"}}, r"'output' is set by the pipeline"),
    ({"name": "c", "command": "gatt", "args": {"input": {"a": 1}}}, r"stage 'c'.args.input: expected a string"),
    ({"name": "c", "command": "gatt", "args": {"checkpoint": "x"}, "inputs": {"checkpoint": "sft"}},
     r"\['checkpoint'\] given in both args and inputs"),
    ({"name": "c", "command": "gatt", "inputs": {"checkpoint": "later"}}, r"'later' is not an earlier stage"),
    ({"name": "c", "config": "configs/sft/tiny.yaml", "args": {"a": 1}}, r"stage 'c'.args: only a command stage"),
])
def test_bad_command_stages_name_the_file_stage_and_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        stage: dict, match: str) -> None:
    monkeypatch.chdir(ROOT)
    path = _write(tmp_path / "p.yaml", {"run_dir": str(tmp_path / "run"),
                                        "stages": [{"name": "sft", "config": "configs/sft/tiny.yaml"}, stage]})
    with pytest.raises(PipelineError, match=match) as err:
        load_pipeline(path)
    assert str(path) in str(err.value)


def test_report_evaluation_roles_must_be_evaluate_stages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    stages = [{"name": "sft", "config": "configs/sft/tiny.yaml"},
              {"name": "ev", "command": "evaluate", "inputs": {"checkpoint": "sft"}}]
    ok = _write(tmp_path / "ok.yaml", {"run_dir": "r", "stages": stages, "report": {"evaluation": {"before": "ev"}}})
    load_pipeline(ok)
    bad = _write(tmp_path / "bad.yaml", {"run_dir": "r", "stages": stages, "report": {"evaluation": {"after": "sft"}}})
    with pytest.raises(PipelineError, match=r"bad.yaml: report.evaluation.after: stage 'sft' is not an evaluate stage"):
        load_pipeline(bad)


def test_smollm2_pipeline_wires_the_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    pipe = load_pipeline(SMOLLM2)
    configs = stage_configs(pipe)
    sft = configs["sft"]
    assert sft["model"]["init_args"]["init_from"] == GGUF  # the GGUF itself, no conversion step
    assert sft["data"]["init_args"]["sources"][1]["path"] == str(pipe.output("gatt"))
    for name, config in configs.items():
        if "data" in config:
            assert config["data"]["init_args"]["tokenizer_path"] == GGUF, name
            assert config["data"]["init_args"]["chat_template"] == "model", name
            assert config["trainer"]["precision"] == "32-true", name  # CPU bf16 is emulated
    gatt = configs["gatt"]["argv"]
    assert gatt[gatt.index("--checkpoint") + 1] == GGUF and "--require-check" in gatt
    # every evaluate stage scores with both reward models; the RLHF chain starts from the previous round
    for name in ("eval-sft", "eval-cd", "eval-rs-v1", "eval-rs-v2", "eval-final"):
        argv = configs[name]["argv"]
        assert argv[argv.index("--helpful-rm") + 1] == str(pipe.output("rm-helpful"))
        assert argv[argv.index("--safety-rm") + 1] == str(pipe.output("rm-safety"))
    # context distillation: the SFT model's answers, filtered by the safety RM, trained from the SFT model
    distill = configs["distill"]["argv"]
    assert distill[distill.index("--checkpoint") + 1] == str(pipe.output("sft"))
    assert distill[distill.index("--safety-rm") + 1] == str(pipe.output("rm-safety"))
    assert distill[distill.index("--keep") + 1] == "safety-rm"
    assert distill[distill.index("--input") + 1].endswith("hh_harmless_pairs.jsonl.gz")
    sources = configs["sft-cd"]["data"]["init_args"]["sources"]
    assert [s["path"] for s in sources] == [sft["data"]["init_args"]["sources"][0]["path"], str(pipe.output("distill"))]
    chain = [("sft", "sft-cd"), ("sft-cd", "rs-v1"), ("rs-v1", "rs-v2"), ("rs-v2", "ppo-v3")]
    for prev, stage in chain:
        assert configs[stage]["model"]["init_args"]["init_from"] == str(pipe.output(prev))
    pool = [c for c in configs["rs-v2"]["trainer"]["callbacks"] if c["class_path"].endswith("RejectionSamplingCallback")]
    assert pool[0]["init_args"]["pool_from"] == str(pipe.output("rs-v1"))
    assert pipe.report["evaluation"] == {"before": "eval-sft", "after": "eval-final", "gatt_before": "eval-base",
                                         "gatt_after": "eval-sft", "answers": 10}
    check_stage_configs(pipe, configs)  # every fit config parses, every command's options too


# ------------------------------------------------------------------------------------ end to end

CSV_ONLY = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
             "init_args": {"save_dir": "${trainer.default_root_dir}", "name": "csv"}}]
PROMPTS = [{"path": "data/preference/hh_helpful_pairs.jsonl.gz", "format": "hh", "is_safety": False,
            "name": "hh_helpful", "limit": 300},
           {"path": "data/preference/hh_harmless_pairs.jsonl.gz", "format": "hh", "is_safety": True,
            "name": "hh_harmless", "limit": 100}]


def tiny_smollm2_pipeline(tmp_path: Path, gguf: Path) -> Path:
    """configs/pipeline/smollm2-135m.yaml with the GGUF swapped for the tiny one (the pipeline's `set` and
    the command stages' args) and every stage cut to a couple of steps."""
    raw = yaml.safe_load(SMOLLM2.read_text())
    raw["run_dir"] = str(tmp_path / "run")
    raw["set"] = {"trainer.enable_progress_bar": False, "trainer.enable_model_summary": False,
                  "trainer.logger": CSV_ONLY, "data.init_args.tokenizer_path": str(gguf)}
    rlhf = {"model.init_args.max_new_tokens": 6, "model.init_args.minibatch_size": 4,
            "data.init_args.sources": PROMPTS, "data.init_args.batch_size": 4, "data.init_args.max_val_prompts": 2,
            "data.init_args.max_prompt_len": 256}
    fits: dict[str, dict[str, Any]] = {
        "sft": {"model.init_args.init_from": str(gguf), "trainer.max_steps": 2, "trainer.val_check_interval": 2,
                "trainer.limit_val_batches": 1, "data.init_args.max_seq_len": 768, "data.init_args.sources.0.limit": 12},
        # the tiny model has 2 blocks; the real config trains the top 4 of 30
        "rm": {"trainer.max_steps": 2, "trainer.val_check_interval": 2, "data.init_args.max_seq_len": 768,
               "model.init_args.finetune.trainable_blocks": 1},
        "rs": {**rlhf, "trainer.callbacks.RejectionSamplingCallback.init_args.num_samples": 2},
        "ppo": {**rlhf, "trainer.max_epochs": 2, "trainer.check_val_every_n_epoch": 1},
    }
    small_eval = {"xstest-limit": 3, "helpful-limit": 3, "gatt-dialogs": 1, "gatt-turns": 3, "max-new-tokens": 6,
                  "gatt-max-new-tokens": 6, "batch-size": 4, "tokenizer": str(gguf)}
    for stage in raw["stages"]:
        name = stage["name"]
        if stage.get("command") == "gatt":  # sampled, not greedy: a random model's greedy answer is one token
            stage["args"] = {**stage["args"], "checkpoint": str(gguf), "limit": 4, "max-new-tokens": 6,
                             "temperature": 1.0, "top-p": 1.0, "require-check": False, "batch-size": 4}
        elif stage.get("command") == "distill":
            stage["args"] = {**stage["args"], "limit": 8, "max-new-tokens": 6, "temperature": 1.0, "top-p": 1.0,
                             "batch-size": 4, "tokenizer": str(gguf)}
        elif stage.get("command") == "evaluate":
            args = {**stage["args"], **{k: v for k, v in small_eval.items() if k in stage["args"] or k == "tokenizer"}}
            if "checkpoint" in args and args["checkpoint"] is not None:
                args["checkpoint"] = str(gguf)
            stage["args"] = args
        elif name.startswith("rm-"):
            sources = copy.deepcopy(yaml.safe_load((ROOT / stage["config"]).read_text())["data"]["init_args"]["sources"])
            stage["set"] = {**fits["rm"], "data.init_args.sources": [{**s, "limit": 60} for s in sources]}
        else:
            stage["set"] = {**stage.get("set", {}), **fits[name.split("-")[0]]}
    raw["report"]["wandb"] = False
    return _write(tmp_path / "tiny-smollm2.yaml", raw)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_tiny_smollm2_pipeline_hands_each_stage_a_real_checkpoint_and_reports_every_check(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    pipe = load_pipeline(tiny_smollm2_pipeline(tmp_path, gguf))
    lines: list[str] = []
    records = run_pipeline(pipe, print_fn=lines.append)
    names = [s.name for s in pipe.stages]
    assert list(records) == names
    assert sum(" done in " in line for line in lines) == len(names)
    assert any("eval-sft" in line and "unsafe-compliance=" in line for line in lines)  # the command's headline

    # gatt -> sft: the SFT read the dialogs the gatt stage wrote, starting from the GGUF's weights
    dialogs = [json.loads(line) for line in pipe.output("gatt").read_text().splitlines()]
    assert dialogs and all(d["train_turns"][-1] and not any(d["train_turns"][:-1]) for d in dialogs)
    assert all(d["messages"][0]["role"] == "system" for d in dialogs)
    sft_cfg = yaml.safe_load((pipe.stage_dir("sft") / "stage-config.yaml").read_text())
    assert sft_cfg["data"]["init_args"]["sources"][1]["path"] == str(pipe.output("gatt"))
    _, base = load_checkpoint(gguf)
    out = {n: _state(pipe.output(n)) for n in names if pipe.stage(n).command is None}
    sft = _part(out["sft"], "model.")
    assert sft.keys() == base.keys() and not _same(sft, base)  # trained away from the GGUF's weights
    # both RMs start from the SFT trunk; each RLHF stage's frozen reference is the previous stage's policy
    for rm in ("rm-helpful", "rm-safety"):
        trunk = _part(out[rm], "model.trunk.")
        assert set(trunk) <= set(sft) and not _same(trunk, {k: sft[k] for k in trunk})
    for prev, stage in [("sft-cd", "rs-v1"), ("rs-v1", "rs-v2"), ("rs-v2", "ppo-v3")]:
        assert _same(_part(out[stage], "ref_model."), _part(out[prev], "model.")), stage
    # distill -> sft-cd: dialogs the safety RM preferred to the plain answers, trained on from the SFT model
    distilled = [json.loads(line) for line in pipe.output("distill").read_text().splitlines()]
    assert distilled and all(d["safety_rm_score"] > d["plain_safety_rm_score"] for d in distilled)
    assert all([m["role"] for m in d["messages"]] == ["user", "assistant"] for d in distilled)
    cd_cfg = yaml.safe_load((pipe.stage_dir("sft-cd") / "stage-config.yaml").read_text())
    assert cd_cfg["model"]["init_args"]["init_from"] == str(pipe.output("sft"))
    assert cd_cfg["data"]["init_args"]["sources"][1]["path"] == str(pipe.output("distill"))
    assert not _same(_part(out["sft-cd"], "model."), sft)
    # each evaluate stage read the checkpoint of the stage it names, and wrote every section it was asked for
    for ev, source in [("eval-sft", "sft"), ("eval-cd", "sft-cd"), ("eval-rs-v1", "rs-v1"), ("eval-rs-v2", "rs-v2"),
                       ("eval-final", "ppo-v3")]:
        result = json.loads(pipe.output(ev).read_text())
        assert result["checkpoint"] == str(pipe.output(source))
        assert result["xstest"]["n_unsafe"] == result["xstest"]["n_safe"] == 3
        assert all(a["safety"] is not None for a in result["xstest"]["answers"]["unsafe"])  # the safety RM's view
    base_eval = json.loads(pipe.output("eval-base").read_text())
    assert set(base_eval) >= {"gatt"} and "xstest" not in base_eval and base_eval["checkpoint"] == str(gguf)
    final = json.loads(pipe.output("eval-final").read_text())
    assert len(final["helpfulness"]["answers"]) == 3 and len(final["gatt"]["mean_by_turn"]) == 3

    report = (pipe.run_dir / "report.md").read_text()
    for section in ("## Stages", "## Supervised fine-tuning" if False else "## Pretraining and supervised fine-tuning",
                    "## Reward models", "## RLHF rounds", "## Evaluation settings", "## Safety: XSTest (never trained on)",
                    "## Helpfulness on held-out prompts", "length-controlled", "## GAtt: a system instruction kept",
                    "## Reward models against length baselines", "## 3 held-out prompts: eval-sft vs eval-final",
                    "eval-sft → eval-final: unsafe compliance", "before GAtt SFT (eval-base)", "longer wins"):
        assert section in report, section
    assert "| eval-sft (sft) |" in report and "| eval-cd (sft-cd) |" in report  # the trade-off over rounds
    assert "| eval-rs-v2 (rs-v2) |" in report
    summary = json.loads((pipe.run_dir / "evaluation-summary.json").read_text())
    assert 0.0 <= summary["helpfulness"]["lc_win_rate"] <= 1.0
    assert {"rm-helpful/hh_helpful", "rm-safety/hh_harmless"} <= set(summary["reward_models"])
    rm = summary["reward_models"]["rm-helpful/hh_helpful"]
    assert rm["longer_wins"] + rm["shorter_wins"] == pytest.approx(1.0) and rm["accuracy"] is not None

    # a rerun skips every stage; an evaluate stage without its stage.json runs again (commands do not resume)
    (pipe.stage_dir("eval-final") / "stage.json").unlink()
    lines.clear()
    run_pipeline(pipe, report=False, print_fn=lines.append)
    assert sum("skipped" in line for line in lines) == len(names) - 1
    assert any(line.startswith(f"[{len(names)}/{len(names)}] eval-final") and "running" in line for line in lines)
