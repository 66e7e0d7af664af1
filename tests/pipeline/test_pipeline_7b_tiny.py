"""The 7B pipeline's own stage configs and wiring (configs/pipeline/llama2-7b.yaml), shrunk to the `tiny`
preset and run on 2 CPU processes under the configs' ModelParallelStrategy (FSDP2, bf16 compute): every
checkpoint is a sharded directory, which rs-v2 reads its pool from and PPO starts from (issue 15)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from paths import ROOT

from llama2_lightning.callbacks.rejection_sampling import pool_state_from_checkpoint
from llama2_lightning.checkpoint import read_config
from llama2_lightning.pipeline.run import run_pipeline
from llama2_lightning.pipeline.spec import load_pipeline

CSV_ONLY = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
             "init_args": {"save_dir": "${trainer.default_root_dir}", "name": "csv"}}]
PROMPTS = [{"path": "data/preference/hh_helpful_pairs.jsonl.gz", "format": "hh", "is_safety": False, "limit": 40},
           {"path": "data/preference/hh_harmless_pairs.jsonl.gz", "format": "hh", "is_safety": True, "limit": 30}]


def _tiny_data(config: str, **overrides: Any) -> dict[str, Any]:
    """The data block of a tiny config (shipped files), to stand in for a 7B config's /path/to/... data."""
    return {**yaml.safe_load((ROOT / "configs" / config).read_text())["data"]["init_args"], **overrides}


def tiny_7b_pipeline(tmp_path: Path) -> Path:
    raw = yaml.safe_load((ROOT / "configs" / "pipeline" / "llama2-7b.yaml").read_text())
    raw["run_dir"] = str(tmp_path / "run")
    # every stage: 2 CPU processes of the configs' own ModelParallelStrategy, the tiny preset
    raw["set"] = {"trainer.accelerator": "cpu", "trainer.devices": 2, "trainer.num_nodes": 1,
                  "trainer.strategy.init_args.data_parallel_size": 2, "trainer.logger": CSV_ONLY,
                  "trainer.enable_progress_bar": False, "trainer.enable_model_summary": False,
                  "model.init_args.model": "tiny"}
    steps = {"trainer.max_steps": 2, "trainer.accumulate_grad_batches": 1, "trainer.val_check_interval": 2,
             "trainer.limit_val_batches": 1}
    rlhf = {"trainer.max_epochs": 1, "model.init_args.max_new_tokens": 8, "model.init_args.minibatch_size": 2,
            "model.init_args.micro_batch_size": 1,
            "data.init_args": _tiny_data("rlhf/tiny-rejection-sampling.yaml", sources=PROMPTS, val_sources=None,
                                         batch_size=6, max_val_prompts=4, val_fraction=0.1, max_prompt_len=96)}
    small = {
        "pretrain": {**steps, "data.init_args": _tiny_data("pretrain/tiny.yaml", max_seq_len=64, batch_size=2),
                     "trainer.callbacks.ModelCheckpoint.init_args.every_n_train_steps": 2,
                     "trainer.callbacks.GenerationSamples.init_args.every_n_steps": 100},
        "sft": {**steps, "data.init_args": _tiny_data("sft/tiny.yaml", max_seq_len=128, batch_size=2)},
        "rm-helpful": {**steps, "data.init_args": _tiny_data("reward/tiny-helpful.yaml", max_seq_len=128, batch_size=2)},
        "rm-safety": {**steps, "data.init_args": _tiny_data("reward/tiny-safety.yaml", max_seq_len=128, batch_size=2)},
        "rs": {**rlhf, "trainer.callbacks.RejectionSamplingCallback.init_args.num_samples": 2},
        "ppo": {**rlhf, "trainer.max_epochs": 2, "trainer.check_val_every_n_epoch": 1},
    }
    for key in ("rm-helpful", "rm-safety"):  # a few pairs per source
        data = small[key]["data.init_args"]
        data["sources"] = [{**s, "limit": 40} for s in data["sources"]]
    # rs-v3 and rs-v4 repeat rs-v2's wiring: the test stops the rounds at rs-v2 and starts PPO from it
    raw["stages"] = [s for s in raw["stages"] if s["name"] not in ("rs-v3", "rs-v4")]
    for stage in raw["stages"]:
        name = stage["name"]
        kind = "rs" if name.startswith("rs-") else "ppo" if name.startswith("ppo-") else name
        # the stage's own sets last: data.init_args.start_iteration must survive the data block swap
        stage["set"] = {**small[kind], **(stage.get("set") or {})}
        if kind == "ppo":
            stage["inputs"] = {**stage["inputs"], "model.init_args.init_from": "rs-v2"}
    raw["report"].update({"max_prompts": 4, "table_rows": 2, "wandb": False})
    path = tmp_path / "llama2-7b-tiny.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.slow
def test_the_7b_pipeline_at_tiny_size_runs_through_rs_v2_and_ppo(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    pipe = load_pipeline(tiny_7b_pipeline(tmp_path))
    lines: list[str] = []
    records = run_pipeline(pipe, print_fn=lines.append)
    names = [s.name for s in pipe.stages]
    assert names == ["pretrain", "sft", "rm-helpful", "rm-safety", "rs-v1", "rs-v2", "ppo-v5"]
    assert list(records) == names
    for name in names:
        rec = json.loads((pipe.stage_dir(name) / "stage.json").read_text())
        assert rec["value"] is not None and math.isfinite(rec["value"]), name
        out = pipe.output(name).resolve()
        assert out.is_dir() and (out / "meta.pt").is_file(), name  # sharded, as on the GPU clusters
        assert read_config(out).dim == 64, name  # the tiny preset throughout (read from meta.pt)
    # rs-v2 started from rs-v1's pool (a sharded directory) and added its own round's prompts
    v1, v2 = (pool_state_from_checkpoint(pipe.output(n)) for n in ("rs-v1", "rs-v2"))
    assert (v1["round"], v2["round"]) == (1, 2)
    assert {e["index"] for e in v1["pool"]} < {e["index"] for e in v2["pool"]}
    assert len(v2["pool"]) == 2 * len(v1["pool"]) == 12  # 6 prompts per round, over both ranks
    report = (pipe.run_dir / "report.md").read_text()
    assert "## The same held-out prompts: sft vs ppo-v5" in report
