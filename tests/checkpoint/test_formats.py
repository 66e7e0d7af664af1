"""Checkpoint conversion against independent references: transformers' LlamaForCausalLM for the
Hugging Face format (logit parity both ways) and exact tensor round trips for Meta's sharded layout."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch

from llama2_lightning.checkpoint import (
    check_state_dict, detect_format, expected_shapes, load_checkpoint, load_hf, load_lightning, load_meta, load_model,
    save_hf, save_meta,
)
from llama2_lightning.checkpoint.meta import _with_meta_ffn_fields
from llama2_lightning.commands.convert import cli_convert
from llama2_lightning.config import LlamaConfig
from llama2_lightning.model import Transformer, rope_frequencies

try:  # the Hugging Face parity tests need transformers; the Meta and Lightning ones do not
    import transformers
except ImportError:
    transformers = None

TOKENS = torch.randint(0, 2048, (2, 12), generator=torch.Generator().manual_seed(0))


def random_state_dict(config: LlamaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Distinct random values everywhere (norms included) so a wrong split or permutation shows."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(tuple(shape), generator=gen) for name, shape in expected_shapes(config).items()}


@pytest.fixture(scope="module")
def hf_model() -> transformers.LlamaForCausalLM:
    if transformers is None:
        pytest.skip("transformers is not installed")
    torch.manual_seed(0)
    # A non-default rope_theta so the config round trip through transformers is really checked.
    config = LlamaConfig.from_name("tiny", rope_theta=50000.0)
    hf_config = transformers.LlamaConfig(**config.to_hf_config())
    model = transformers.LlamaForCausalLM(hf_config).eval()
    # HF's init leaves norms at 1, which would hide a norm mapped to the wrong place.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def hf_logits(model: transformers.LlamaForCausalLM) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def our_logits(model: Transformer) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(TOKENS)


# ---------------------------------------------------------------------------------------------- Hugging Face
def test_hf_to_meta_to_hf_matches_transformers(hf_model, tmp_path: Path) -> None:
    hf_dir, meta_dir, back_dir = tmp_path / "hf", tmp_path / "meta", tmp_path / "back"
    hf_model.save_pretrained(hf_dir)
    (hf_dir / "tokenizer.model").write_bytes(b"not really sentencepiece")
    expected = hf_logits(hf_model)

    assert cli_convert(["--from", "hf", "--to", "meta", str(hf_dir), str(meta_dir)]) == 0
    assert detect_format(meta_dir) == "meta"
    assert (meta_dir / "tokenizer.model").read_bytes() == b"not really sentencepiece"
    model = load_model(meta_dir)
    assert model.config.rope_theta == 50000.0
    torch.testing.assert_close(our_logits(model), expected, atol=1e-4, rtol=0)

    assert cli_convert(["--from", "meta", "--to", "hf", str(meta_dir), str(back_dir)]) == 0
    reloaded, info = transformers.LlamaForCausalLM.from_pretrained(back_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert reloaded.config.rope_parameters["rope_theta"] == 50000.0
    torch.testing.assert_close(hf_logits(reloaded.eval()), expected, atol=1e-4, rtol=0)
    # The permutation must be undone and redone exactly, not just closely.
    for name, tensor in hf_model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_hf_sharded_import_and_export(hf_model, tmp_path: Path) -> None:
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    config, state_dict = load_hf(tmp_path / "hf")
    model = load_model(tmp_path / "hf")
    torch.testing.assert_close(our_logits(model), hf_logits(hf_model), atol=1e-4, rtol=0)

    save_hf(config, state_dict, tmp_path / "out", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    torch.testing.assert_close(hf_logits(reloaded.eval()), hf_logits(hf_model), atol=1e-4, rtol=0)


def test_hf_pytorch_model_bin_imports(hf_model, tmp_path: Path) -> None:
    hf_model.config.save_pretrained(tmp_path)
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    torch.testing.assert_close(our_logits(load_model(tmp_path)), hf_logits(hf_model), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------- Meta shards
SPLIT_DIMS = {
    "tok_embeddings.weight": 1, "output.weight": 0, "norm.weight": None,
    "layers.1.attention.wq.weight": 0, "layers.1.attention.wk.weight": 0, "layers.1.attention.wv.weight": 0,
    "layers.1.attention.wo.weight": 1, "layers.1.feed_forward.w1.weight": 0,
    "layers.1.feed_forward.w2.weight": 1, "layers.1.feed_forward.w3.weight": 0,
    "layers.1.attention_norm.weight": None, "layers.1.ffn_norm.weight": None,
}


@pytest.mark.parametrize(
    ("preset", "overrides", "num_shards"),
    [
        ("tiny", {}, 2),  # GQA: 4 query heads, 2 KV heads
        ("tiny-mqa", {}, 1),  # one KV head cannot be split across ranks
        ("tiny-mha", {}, 2),
        ("tiny-mha", {"n_heads": 8, "n_kv_heads": 8}, 8),  # 70B's layout: one KV head per rank
    ],
)
def test_meta_sharded_round_trip(tmp_path: Path, preset: str, overrides: dict, num_shards: int) -> None:
    config = LlamaConfig.from_name(preset, **overrides)
    state_dict = random_state_dict(config)
    save_meta(config, state_dict, tmp_path, num_shards=num_shards)

    shards = sorted(tmp_path.glob("consolidated.*.pth"))
    assert [p.name for p in shards] == [f"consolidated.{i:02d}.pth" for i in range(num_shards)]
    for rank, path in enumerate(shards):
        shard = torch.load(path, weights_only=True)
        assert set(shard) == set(state_dict)
        for name, dim in SPLIT_DIMS.items():
            full = state_dict[name]
            if dim is None:
                assert torch.equal(shard[name], full), name
            else:
                assert shard[name].shape[dim] == full.shape[dim] // num_shards, name
                assert torch.equal(shard[name], full.chunk(num_shards, dim)[rank]), name

    loaded_config, loaded = load_meta(tmp_path)
    assert loaded_config == config
    assert set(loaded) == set(state_dict)
    for name, tensor in state_dict.items():
        assert torch.equal(loaded[name], tensor), name


def test_meta_vocab_size_minus_one_and_rope_freqs(tmp_path: Path) -> None:
    # Meta's Llama 2 release: params.json has vocab_size -1, no max_seq_len, and some files carry rope.freqs.
    config = LlamaConfig.from_name("tiny", max_seq_len=4096)
    state_dict = random_state_dict(config)
    torch.save({**state_dict, "rope.freqs": torch.zeros(8)}, tmp_path / "consolidated.00.pth")
    params = {k: v for k, v in config.to_meta_params().items() if k != "max_seq_len"}
    (tmp_path / "params.json").write_text(json.dumps({**params, "vocab_size": -1}))
    loaded_config, loaded = load_meta(tmp_path)
    assert loaded_config.vocab_size == 2048
    assert set(loaded) == set(state_dict)


def test_meta_params_json_has_no_hidden_dim_for_released_shapes(tmp_path: Path) -> None:
    # An HF config carries only intermediate_size; 70B's (28672) must map back to Meta's multiple_of /
    # ffn_dim_multiplier, since Meta's ModelArgs rejects a hidden_dim key. Only configs are built here.
    hf_style = LlamaConfig(dim=8192, n_layers=1, n_heads=64, n_kv_heads=8, hidden_dim=28672)
    params = _with_meta_ffn_fields(hf_style).to_meta_params()
    assert "hidden_dim" not in params
    assert (params["multiple_of"], params["ffn_dim_multiplier"]) == (4096, 1.3)
    odd = LlamaConfig(dim=64, n_layers=1, n_heads=4, hidden_dim=100)
    assert _with_meta_ffn_fields(odd).to_meta_params()["hidden_dim"] == 100


def test_meta_indivisible_shards_error(tmp_path: Path) -> None:
    config = LlamaConfig.from_name("tiny")  # n_kv_heads = 2
    with pytest.raises(ValueError, match=r"n_kv_heads=2.*not divisible by 4"):
        save_meta(config, random_state_dict(config), tmp_path, num_shards=4)


def test_meta_replicated_norm_disagreement_is_an_error(tmp_path: Path) -> None:
    config = LlamaConfig.from_name("tiny")
    save_meta(config, random_state_dict(config), tmp_path, num_shards=2)
    shard = torch.load(tmp_path / "consolidated.01.pth", weights_only=True)
    shard["norm.weight"] = shard["norm.weight"] + 1
    torch.save(shard, tmp_path / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"norm\.weight.*replicated.*consolidated\.01\.pth"):
        load_meta(tmp_path)


# ---------------------------------------------------------------------------------------------- errors
def test_check_state_dict_reports_everything() -> None:
    config = LlamaConfig.from_name("tiny")
    state_dict = random_state_dict(config)
    state_dict["layers.0.attention.wk.weight"] = torch.zeros(16, 64)
    del state_dict["layers.1.ffn_norm.weight"]
    state_dict["layers.0.attention.bias"] = torch.zeros(3)
    with pytest.raises(ValueError) as err:
        check_state_dict(expected_shapes(config), state_dict, "some/ckpt")
    message = str(err.value)
    assert message.startswith("some/ckpt:")
    assert "layers.0.attention.wk.weight: checkpoint (16, 64) vs model (32, 64)" in message
    assert "missing keys (1): layers.1.ffn_norm.weight" in message
    assert "unexpected keys (1): layers.0.attention.bias" in message
    check_state_dict(Transformer(config), random_state_dict(config), "ok")  # a Module works as the reference


def test_hf_shape_mismatch_and_unknown_key_name_the_tensor(hf_model, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    hf_model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"] = torch.zeros(100, 64)
    weights["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    del weights["model.norm.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        load_hf(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message
    assert "layers.0.feed_forward.w3.weight: checkpoint (100, 64) vs model (192, 64)" in message
    assert "model.layers.0.mlp.extra.weight" in message  # named as it appears in the user's files
    assert "missing keys (1): norm.weight" in message


def test_convert_refuses_non_empty_dst_and_cleans_up_on_error(hf_model, tmp_path: Path, capsys) -> None:
    hf_model.save_pretrained(tmp_path / "hf")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert cli_convert(["--from", "hf", "--to", "meta", str(tmp_path / "hf"), str(dst)]) == 1
    assert "--force" in capsys.readouterr().err
    assert (dst / "keep.txt").read_text() == "mine"

    # GQA tiny cannot be split 4 ways: an error, and no temporary directory left behind.
    args = ["--from", "hf", "--to", "meta", "--num-shards", "4", "--force", str(tmp_path / "hf"), str(dst)]
    assert cli_convert(args) == 1
    assert "n_kv_heads=2" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "hf"]
    assert (dst / "keep.txt").exists()

    args = ["--from", "hf", "--to", "meta", "--force", "--dtype", "bfloat16", str(tmp_path / "hf"), str(dst)]
    assert cli_convert(args) == 0
    assert not (dst / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "hf"]
    _, state_dict = load_checkpoint(dst)
    assert all(t.dtype == torch.bfloat16 for t in state_dict.values())


# ---------------------------------------------------------------------------------------------- Lightning
def test_lightning_ckpt(tmp_path: Path) -> None:
    config = LlamaConfig.from_name("tiny")
    weights = random_state_dict(config)
    ckpt = {
        "state_dict": {
            **{f"model.{k}": v for k, v in weights.items()},
            "ref_model.output.weight": torch.zeros(3, 3),  # another submodule's weights: not ours
            "value_head.weight": torch.zeros(1, 64),
        },
        "llama_config": config.to_dict(),
        "epoch": 3,
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 1e-3}]}],
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    assert detect_format(tmp_path / "last.ckpt") == "lightning"
    loaded_config, loaded = load_lightning(tmp_path / "last.ckpt")
    assert loaded_config == config
    assert set(loaded) == set(weights)
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())

    model = load_model(tmp_path / "last.ckpt")
    reference = Transformer(config)
    reference.load_state_dict(weights)
    # The RoPE buffer is not in the checkpoint; load_model must recompute it, not leave it on meta.
    assert model.rope_table.device.type == "cpu"
    torch.testing.assert_close(model.rope_table, torch.view_as_real(rope_frequencies(
        config.max_seq_len, config.head_dim, config.rope_theta)), atol=0, rtol=0)
    assert torch.equal(our_logits(model), our_logits(reference))
    assert load_model(tmp_path / "last.ckpt", dtype=torch.bfloat16).output.weight.dtype == torch.bfloat16

    assert cli_convert(["--from", "lightning", "--to", "hf", str(tmp_path / "last.ckpt"), str(tmp_path / "hf")]) == 0
    _, via_hf = load_hf(tmp_path / "hf")
    assert all(torch.equal(via_hf[k], v) for k, v in weights.items())

    with pytest.raises(ValueError, match=r"no weights under prefix 'policy\.'.*'model\.'"):
        load_lightning(tmp_path / "last.ckpt", prefix="policy.")


def test_lightning_ckpt_without_config_or_sharded_dir(tmp_path: Path) -> None:
    torch.save({"state_dict": {}}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=r"bad\.ckpt.*'llama_config'"):
        load_lightning(tmp_path / "bad.ckpt")
    sharded = tmp_path / "epoch=1.ckpt"
    sharded.mkdir()
    with pytest.raises(ValueError, match=r"epoch=1\.ckpt is a directory but not a sharded Lightning checkpoint"):
        load_checkpoint(sharded)


# ---------------------------------------------------------------------------------------------- safe loading
class _Payload:
    """Unpickling this runs `_mark`: stands in for a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_mark, (str(self.marker),))


def _mark(path: str) -> int:
    Path(path).write_text("executed")
    return 0


@pytest.mark.parametrize("fmt", ["meta", "hf", "lightning"])
def test_pickled_code_is_refused(tmp_path: Path, fmt: str) -> None:
    marker = tmp_path / "marker"
    payload = {"tok_embeddings.weight": torch.zeros(2), "evil": _Payload(marker)}
    src = tmp_path / "src"
    src.mkdir()
    config = LlamaConfig.from_name("tiny")
    if fmt == "meta":
        path = src / "consolidated.00.pth"
        (src / "params.json").write_text(json.dumps(config.to_meta_params()))
    elif fmt == "hf":
        path = src / "pytorch_model.bin"
        (src / "config.json").write_text(json.dumps(config.to_hf_config()))
    else:
        path = src = tmp_path / "evil.ckpt"
        payload = {"state_dict": payload, "llama_config": config.to_dict()}
    torch.save(payload, path)

    with pytest.raises(pickle.UnpicklingError, match=re.escape(str(path))):
        load_checkpoint(src, fmt)
    assert not marker.exists()
    # The payload is live: a trusting load would have run it.
    torch.load(path, weights_only=False)
    assert marker.read_text() == "executed"


def test_read_config_for_every_format(tmp_path: Path) -> None:
    from llama2_lightning.checkpoint import read_config

    cfg = LlamaConfig.from_name("tiny")
    sd = Transformer(cfg).state_dict()
    save_hf(cfg, sd, tmp_path / "hf")
    save_meta(cfg, sd, tmp_path / "meta")
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "llama_config": cfg.to_dict()},
               tmp_path / "x.ckpt")
    for src in ("hf", "meta", "x.ckpt"):
        assert read_config(tmp_path / src).architecture() == cfg.architecture()
