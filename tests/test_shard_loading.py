"""Meta-device build, per-rank loading and bf16 FSDP2 (issue 15): the quick, one-process checks."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
from paths import ROOT
from torch.distributed.tensor import DTensor

from llama2_lightning.config import LlamaConfig
from llama2_lightning.distributed import shard_transformer
from llama2_lightning.model import Transformer
from llama2_lightning.modules import SFTModule, common
from llama2_lightning.modules.args import ShardingArgs




@pytest.fixture
def bf16_ckpt(tmp_path: Path) -> Path:
    """A Lightning checkpoint of the tiny model whose weights are bfloat16 (as Meta and HF release them)."""
    torch.manual_seed(0)
    model = Transformer.from_name("tiny").to(torch.bfloat16)
    path = tmp_path / "tiny-bf16.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "llama_config": model.config.to_dict()}, path)
    return path


def test_bf16_fsdp2_keeps_rope_float32(mesh1: object) -> None:
    """FSDP2's mixed precision casts a unit's floating-point inputs; the blocks' must not be (the RoPE
    table would arrive in bf16, and view_as_complex rejects bf16). Logits and gradients stay within
    bf16 rounding of the float32 model, with activation checkpointing on."""
    torch.manual_seed(0)
    ref = Transformer.from_name("tiny")
    model = shard_transformer(copy.deepcopy(ref), mesh1, "bfloat16", "float32", float32_outputs=True)
    model.activation_checkpointing = True
    seen: list[torch.dtype] = []
    model.layers[0].register_forward_pre_hook(lambda mod, args: seen.append(args[1].dtype))
    tokens = torch.randint(0, 2048, (2, 16))
    logits = model(tokens)  # raised "view_as_complex is only supported for half, float and double" before
    assert seen == [torch.float32]
    assert logits.dtype == torch.float32  # the root unit returns float32 logits for the losses
    expected = ref(tokens)
    torch.testing.assert_close(logits, expected, atol=0.05, rtol=0.02)
    logits.square().mean().backward()
    expected.square().mean().backward()
    grad = model.layers[0].attention.wq.weight.grad
    assert isinstance(grad, DTensor) and grad.dtype == torch.float32  # reduced in float32
    torch.testing.assert_close(grad.full_tensor(), ref.layers[0].attention.wq.weight.grad, atol=2e-6, rtol=0.05)


def test_configure_model_builds_every_parameter_on_meta(mesh1: object, bf16_ckpt: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """configure_model builds on the meta device and shards before any storage exists; only then does
    each rank materialise its shard and copy its slice of the checkpoint, upcast to float32."""
    seen: list[tuple[bool, bool]] = []
    original = common.materialize

    def recording(module: torch.nn.Module, *args, **kwargs) -> None:
        seen.append((all(p.is_meta for p in module.parameters()),
                     all(isinstance(p, DTensor) for p in module.parameters())))
        original(module, *args, **kwargs)

    monkeypatch.setattr(common, "materialize", recording)
    module = SFTModule(init_from=str(bf16_ckpt), model="tiny",
                       sharding=ShardingArgs(param_dtype="bfloat16", activation_checkpointing=True))
    module._device_mesh = mesh1
    module.configure_model()
    assert seen == [(True, True)]
    state = torch.load(bf16_ckpt, weights_only=True)["state_dict"]
    for name, p in module.model.named_parameters():
        assert not p.is_meta and p.dtype == torch.float32, name
        torch.testing.assert_close(p.full_tensor(), state[f"model.{name}"].float(), atol=0, rtol=0)
    assert not module.model.rope_table.is_meta


def test_sft_from_bf16_checkpoint_has_float32_master_weights(bf16_ckpt: Path) -> None:
    """load_state_dict(assign=True) used to keep the checkpoint's bf16 tensors as the master weights."""
    module = SFTModule(init_from=str(bf16_ckpt), model="tiny")
    module.configure_model()
    state = torch.load(bf16_ckpt, weights_only=True)["state_dict"]
    assert {p.dtype for p in module.model.parameters()} == {torch.float32}
    assert torch.equal(module.model.output.weight, state["model.output.weight"].float())
    # a step at the paper's SFT learning rate moves the weights (in bf16 most would round back)
    opt = torch.optim.AdamW(module.model.parameters(), lr=2e-5)
    module.model(torch.randint(0, 2048, (2, 8))).square().mean().backward()
    before = module.model.layers[0].attention.wq.weight.detach().clone()
    opt.step()
    changed = (module.model.layers[0].attention.wq.weight != before).float().mean()
    assert changed > 0.9


def test_checkpoint_with_wrong_shape_names_the_tensor(bf16_ckpt: Path, tmp_path: Path) -> None:
    from llama2_lightning.shard_loading import materialize

    with torch.device("meta"):
        model = Transformer(LlamaConfig.from_name("tiny"))
    bad = {"norm.weight": torch.ones(3)}
    expected = r"ckpt.pt: tensor norm\.weight: shape \(3,\) in the checkpoint, expected \(64,\)"
    with pytest.raises(ValueError, match=expected):
        materialize(model, "cpu", bad, source="ckpt.pt")
    with pytest.raises(ValueError, match="tensors that the model does not have: bogus"):
        materialize(model, "cpu", {"bogus": torch.ones(1)}, source="ckpt.pt")


@pytest.mark.slow
def test_two_ranks_hold_half_the_model_in_host_memory(tmp_path: Path) -> None:
    """2 gloo processes build a 168M-parameter model (673 MB in float32) on meta, shard it and load
    their shards of a sharded checkpoint: each one's peak RSS grows by about half the model."""
    ckpt = tmp_path / "ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for mode in ("save", "load"):
        env["MASTER_PORT"] = str(free_port())
        procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "rss_run.py"), mode, str(ckpt)],
                                  env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for r in (0, 1)]
        outs = [p.communicate(timeout=600) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
    for stdout, _ in outs:
        r = json.loads(stdout.strip().splitlines()[-1])
        growth = (r["after_kib"] - r["before_kib"]) * 1024
        assert r["local_bytes"] == r["model_bytes"] // 2
        # its shard (336 MB) plus read buffers; the whole model would be 673 MB
        assert r["local_bytes"] <= growth < 0.75 * r["model_bytes"], (growth, r)


def test_partly_loaded_and_tied_modules() -> None:
    """A tied weight loads under either name; a module the checkpoint covers only in part keeps the part
    it covers (its reset runs first) and initialises the rest."""
    from llama2_lightning.shard_loading import materialize

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(4, 3)
            self.out = torch.nn.Linear(3, 4, bias=True)
            self.out.weight = self.emb.weight

    with torch.device("meta"):
        model = Tied()
    weight = torch.arange(12.0).view(4, 3)
    materialize(model, "cpu", {"emb.weight": weight, "out.weight": weight})  # bias: initialised
    assert model.out.weight is model.emb.weight and torch.equal(model.emb.weight, weight)
    assert not model.out.bias.is_meta and torch.isfinite(model.out.bias).all()
