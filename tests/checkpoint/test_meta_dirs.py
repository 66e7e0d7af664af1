"""Meta directories read without merging (issues 15, 18): the config's tie rule is the same whether or
not ``params.json`` states the vocabulary, and a sharded model loads them as strictly as ``load_meta``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llama2_lightning.checkpoint import load_meta, read_config, save_meta
from llama2_lightning.config import LlamaConfig
from llama2_lightning.model import Transformer
from llama2_lightning.modules import SFTModule


def _meta_dir(path: Path, tied: bool, vocab_in_params: bool, num_shards: int = 2) -> Path:
    torch.manual_seed(0)
    model = Transformer(LlamaConfig.from_name("tiny", tie_word_embeddings=tied))
    save_meta(model.config, model.state_dict(), path, num_shards=num_shards)
    params = json.loads((path / "params.json").read_text())
    params["vocab_size"] = model.config.vocab_size if vocab_in_params else -1
    (path / "params.json").write_text(json.dumps(params))
    return path


@pytest.mark.parametrize("vocab_in_params", [True, False])
@pytest.mark.parametrize("tied", [True, False])
def test_read_config_agrees_with_load_meta(tmp_path: Path, tied: bool, vocab_in_params: bool) -> None:
    src = _meta_dir(tmp_path / "meta", tied, vocab_in_params)
    config = read_config(src)
    assert config.tie_word_embeddings is tied  # was untied for a tied model whose params.json has vocab_size
    assert config == load_meta(src)[0]


def test_an_untied_head_sharing_a_zero_row_with_the_embedding_is_not_tied(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Transformer(LlamaConfig.from_name("tiny"))
    with torch.no_grad():  # pad rows are often zero in both: one shared row must not read as "tied"
        model.tok_embeddings.weight[0].zero_()
        model.output.weight[0].zero_()
    save_meta(model.config, model.state_dict(), tmp_path / "meta", num_shards=2)
    assert read_config(tmp_path / "meta").tie_word_embeddings is False




def test_a_sharded_model_refuses_a_meta_directory_missing_a_tensor(tmp_path: Path, mesh1: object) -> None:
    src = _meta_dir(tmp_path / "meta", tied=False, vocab_in_params=False)
    for shard in sorted(src.glob("consolidated.*.pth")):
        state = torch.load(shard, weights_only=True)
        del state["layers.1.feed_forward.w2.weight"]
        torch.save(state, shard)
    module = SFTModule(init_from=str(src), model="tiny")
    module._device_mesh = mesh1
    with pytest.raises(ValueError, match=r"missing keys \(1\): layers\.1\.feed_forward\.w2\.weight"):
        module.configure_model()  # before: that block's w2 was silently re-initialised at random


def test_a_sharded_model_loads_a_tied_meta_directory(tmp_path: Path, mesh1: object) -> None:
    src = _meta_dir(tmp_path / "meta", tied=True, vocab_in_params=False)
    module = SFTModule(init_from=str(src), model=None)
    module._device_mesh = mesh1
    module.configure_model()  # raised "tensors that the model does not have: output.weight"
    _, whole = load_meta(src)
    for name, p in module.model.named_parameters():
        torch.testing.assert_close(p.full_tensor(), whole[name], atol=0, rtol=0)
