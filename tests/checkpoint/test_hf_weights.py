"""Hugging Face safetensors read block by block into a sharded model (issue 15): every block equals the
same block of ``load_hf``'s whole tensor (rotary permutation undone), reads touch only the heads holding
the block, and a sharded SFT model built from an HF directory equals the one built from ``load_hf``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from llama2_lightning.checkpoint import load_hf, save_hf
from llama2_lightning.checkpoint import hf_weights as hf_weights_module
from llama2_lightning.checkpoint.hf_weights import hf_weights
from llama2_lightning.config import LlamaConfig
from llama2_lightning.model import Transformer
from llama2_lightning.modules import SFTModule


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = Transformer(LlamaConfig.from_name("tiny"))
    save_hf(model.config, {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, tmp_path / "hf",
            max_shard_bytes=200_000)  # several shards with an index, as real releases are
    return tmp_path / "hf"


def test_every_block_equals_the_whole_tensors_block(hf_dir: Path) -> None:
    assert (hf_dir / "model.safetensors.index.json").is_file()
    _, whole = load_hf(hf_dir)
    lazy = hf_weights(hf_dir)
    assert lazy is not None and set(lazy) == set(whole)
    for name, tensor in whole.items():
        weight = lazy[name]
        assert tuple(weight.shape) == tuple(tensor.shape) and weight.dtype == tensor.dtype, name
        rows = tensor.shape[0]
        # blocks that start and end inside heads (wq: 16 rows a head, wk: 16), empty, and whole
        for start, stop in ((0, rows), (3, 21), (17, 18), (rows - 5, rows), (7, 7)):
            block = (slice(start, stop),) + ((slice(2, 9),) if tensor.dim() == 2 else ())
            assert torch.equal(weight[block], tensor[block]), (name, start, stop)


def test_a_block_reads_only_the_heads_that_hold_it(hf_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[tuple[int, int]] = []
    original = hf_weights_module.HFWeight._read

    def recording(self: hf_weights_module.HFWeight, block: tuple[slice, ...]) -> torch.Tensor:
        reads.append((block[0].start or 0, block[0].stop))
        return original(self, block)

    monkeypatch.setattr(hf_weights_module.HFWeight, "_read", recording)
    wq = hf_weights(hf_dir)["layers.0.attention.wq.weight"]  # 4 heads x 16 rows
    wq[(slice(20, 28),)]
    assert reads == [(16, 32)]  # head 1 only, not the 64 rows
    reads.clear()
    hf_weights(hf_dir)["layers.0.feed_forward.w1.weight"][(slice(5, 9),)]
    assert reads == [(5, 9)]




def test_a_sharded_model_from_an_hf_directory_reads_it_lazily(hf_dir: Path, mesh1: object,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("llama2_lightning.checkpoint.hf.read_hf_weights",
                        lambda src: pytest.fail("the sharded path read the whole HF checkpoint"))
    module = SFTModule(init_from=str(hf_dir), model="tiny")
    module._device_mesh = mesh1
    module.configure_model()
    monkeypatch.undo()
    _, whole = load_hf(hf_dir)
    for name, p in module.model.named_parameters():
        assert isinstance(p, DTensor) and p.dtype == torch.float32, name  # fp32 master weights from bf16
        torch.testing.assert_close(p.full_tensor(), whole[name].float(), atol=0, rtol=0)
