"""`llama2-lightning memory`: the per-rank estimate over a simulated cluster (torch's fake process group)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from paths import ROOT

from llama2_lightning.commands.memory import cli_memory

GIB = 1024**3
# Parameter counts published with the Hugging Face conversions of Meta's checkpoints (model cards /
# safetensors metadata), independent of this package's config arithmetic.
PUBLISHED = {"llama2-7b": 6_738_415_616, "llama2-70b": 68_976_648_192}
VOCAB, DIM = 32_000, {"llama2-7b": 4096, "llama2-70b": 8192}


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[str, dict]:
    assert cli_memory(list(args)) == 0
    out = capsys.readouterr().out
    return out, json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("config, world, preset", [("configs/rlhf/llama2-70b-ppo.yaml", 64, "llama2-70b"),
                                                   ("configs/rlhf/llama2-7b-ppo.yaml", 8, "llama2-7b")])
def test_parameter_bytes_per_rank_are_the_model_over_the_world(capsys: pytest.CaptureFixture[str], config: str,
                                                               world: int, preset: str) -> None:
    out, summary = run(capsys, "--config", str(ROOT / config), "--world-size", str(world), "--gpu-memory-gib", "80")
    policy = PUBLISHED[preset]
    value = policy - VOCAB * DIM[preset] + DIM[preset]  # LM head dropped, a (1, dim) scalar head
    expected = (policy + value) * 4 / world  # float32 master weights of the two trained models
    assert summary["components"]["params"] * GIB == pytest.approx(expected, rel=0.01)
    assert summary["models"]["policy"]["numel"] == policy
    assert summary["models"]["policy"]["local_numel"] == pytest.approx(policy / world, rel=0.01)
    assert summary["components"]["grads"] == summary["components"]["params"]
    assert summary["components"]["optimizer_state"] == pytest.approx(2 * summary["components"]["params"], rel=1e-3)
    assert set(summary["components"]) >= {"params", "grads", "optimizer_state", "frozen_models", "activations",
                                          "kv_cache"}
    assert "GiB per rank" in out and "how:" in out


def test_a_config_that_does_not_fit_names_the_component(capsys: pytest.CaptureFixture[str]) -> None:
    # 7B PPO decoding all 64 prompts per GPU at once: a 128 GiB KV cache (4,096 slots x 64 rows)
    out, summary = run(capsys, "--config", str(ROOT / "configs/rlhf/llama2-7b-ppo.yaml"), "--world-size", "8",
                       "--gpu-memory-gib", "80", "--rollout-batch-size", "64")
    assert summary["fits"] is False
    assert summary["components"]["kv_cache"] == pytest.approx(64 * 4096 * 32 * 2 * 4096 * 2 / GIB)
    assert "largest component is kv_cache" in summary["over"] and "does not fit" in out
    # a generation micro-batch of 8 rows bounds it, and 7B PPO then fits 8 x 80 GB
    _, bounded = run(capsys, "--config", str(ROOT / "configs/rlhf/llama2-7b-ppo.yaml"), "--world-size", "8",
                     "--gpu-memory-gib", "80", "--rollout-batch-size", "8")
    assert bounded["fits"] is True and bounded["components"]["kv_cache"] == pytest.approx(16.0)


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: llama2_lightning.modules.SFTModule\n  init_args: {init_from: x}\n")
    with pytest.raises(SystemExit, match="model.init_args.model: give a preset name"):
        cli_memory(["--config", str(bad), "--world-size", "2"])


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("configs/*/llama2-*.yaml")
                                          if "pipeline" not in str(p)))
def test_every_paper_config_has_an_estimate(capsys: pytest.CaptureFixture[str], config: str) -> None:
    _, summary = run(capsys, "--config", str(ROOT / config), "--gpu-memory-gib", "80")
    assert summary["per_rank_gib"] > 0 and isinstance(summary["fits"], bool)
