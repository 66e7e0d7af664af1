"""`llama2-lightning memory`: the per-rank estimate over a simulated cluster (torch's fake process group)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from paths import ROOT

from llama2_lightning.commands.memory import cli_memory
from llama2_lightning.config import LlamaConfig
from llama2_lightning.memory_estimate import ModelSpec, fake_world, parallel_layout, shard_on_meta
from llama2_lightning.model import Transformer

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


def test_70b_ppo_under_tp8_x_fsdp8(capsys: pytest.CaptureFixture[str]) -> None:
    """The config's layout (tensor_parallel_size 8 x data_parallel_size 8) read from its strategy: each
    rank caches 1 of the 8 KV heads for the 64 prompts its replica decodes, and gathers only its TP
    shard of the policy for the rollout."""
    out, summary = run(capsys, "--config", str(ROOT / "configs/rlhf/llama2-70b-ppo.yaml"), "--world-size", "64",
                       "--gpu-memory-gib", "80")
    assert (summary["tensor_parallel_size"], summary["data_parallel_size"]) == (8, 8)
    assert "64 ranks = TP 8 x FSDP 8" in out and summary["fits"] is True
    # 512 prompts over 8 replicas: 64 per replica, decoded 8 at a time (the config's rollout_batch_size);
    # 3,072 + 1,024 slots, 80 layers, K and V, 1 head of 128, bf16
    assert summary["components"]["kv_cache"] * GIB == pytest.approx(8 * 4096 * 80 * 2 * 1 * 128 * 2)
    _, unbounded = run(capsys, "--config", str(ROOT / "configs/rlhf/llama2-70b-ppo.yaml"), "--world-size", "64",
                       "--rollout-batch-size", "64")
    assert unbounded["components"]["kv_cache"] * GIB == pytest.approx(64 * 4096 * 80 * 2 * 1 * 128 * 2)
    # the TP shard of the policy in bf16 (the replicated RMSNorms are 0.001% of it)
    assert summary["components"]["generation_gathered_policy"] * GIB == pytest.approx(
        PUBLISHED["llama2-70b"] * 2 / 8, rel=0.01)


def test_a_tp_config_on_too_few_ranks_names_the_component(capsys: pytest.CaptureFixture[str]) -> None:
    # TP 8 on one node, no data parallelism: every rank holds 1/8 of five 70B models and their Adam state
    _, summary = run(capsys, "--config", str(ROOT / "configs/rlhf/llama2-70b-ppo.yaml"), "--world-size", "8",
                     "--gpu-memory-gib", "80")
    assert (summary["tensor_parallel_size"], summary["data_parallel_size"]) == (8, 1)
    assert summary["fits"] is False and "largest component is optimizer_state" in summary["over"]
    assert summary["models"]["policy"]["local_numel"] == pytest.approx(PUBLISHED["llama2-70b"] / 8, rel=0.01)


def test_the_world_must_hold_whole_tensor_parallel_groups() -> None:
    with pytest.raises(SystemExit, match=r"--world-size 12 is not a multiple of "
                                         r"trainer.strategy.init_args.tensor_parallel_size=8"):
        cli_memory(["--config", str(ROOT / "configs/rlhf/llama2-70b-ppo.yaml"), "--world-size", "12"])


@pytest.mark.parametrize(("strategy", "layout"), [
    ({"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}, (16, 8)),  # auto: TP over a node
    ({"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
      "init_args": {"data_parallel_size": 4, "tensor_parallel_size": 4}}, (16, 4)),
    ("fsdp", (16, 1)),
])
def test_layout_is_read_as_lightning_resolves_it(strategy: object, layout: tuple[int, int]) -> None:
    config = {"trainer": {"devices": 8, "num_nodes": 2, "strategy": strategy}}
    assert parallel_layout(config) == layout


def test_units_gather_only_their_tensor_parallel_shard() -> None:
    """FSDP2 x TP on the fake 2 x 2 mesh: a block gathered over the data-parallel ranks is rank 0's TP
    half of it (RMSNorms whole), counted from the laid-out DTensors."""
    spec = ModelSpec("m", LlamaConfig.from_name("tiny"), True, torch.float32)
    whole = Transformer(spec.config)
    norms = sum(p.numel() for n, p in whole.layers[0].named_parameters() if n.endswith("norm.weight"))
    block = sum(p.numel() for p in whole.layers[0].parameters())
    with fake_world(4, 2) as mesh:
        sizes = shard_on_meta(spec, mesh, torch.bfloat16)
    assert sizes.block == (block - norms) // 2 + norms
    assert sizes.numel == whole.num_parameters() and sizes.local < sizes.gathered < sizes.numel
