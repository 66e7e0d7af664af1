"""GGUF import and export through the gguf package, checked against transformers' GGUF loader."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from llama2_lightning.checkpoint import detect_format, load_checkpoint, load_model, read_config
from llama2_lightning.checkpoint.gguf import (
    llama3_rope_factors, llama3_scaling_from_factors, load_gguf, ours_to_gguf_key, save_gguf,
)
from llama2_lightning.checkpoint.hf import save_hf
from llama2_lightning.commands.convert import cli_convert
from llama2_lightning.config import LlamaConfig
from llama2_lightning.model import Transformer
from llama2_lightning.modules.common import build_config, build_transformer


def tiny(tied: bool = False, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(LlamaConfig.from_name("tiny", tie_word_embeddings=tied, rope_theta=50000.0, **overrides)).eval()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("kind, dtype", [("F32", torch.float32), ("F16", torch.float16), ("BF16", torch.bfloat16)])
def test_unquantised_round_trip_is_exact(tmp_path: Path, tied: bool, kind: str, dtype: torch.dtype) -> None:
    model = tiny(tied)
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    save_gguf(model.config, state, tmp_path / "m.gguf", tensor_type=kind)
    assert detect_format(tmp_path / "m.gguf") == "gguf"
    config, loaded = load_checkpoint(tmp_path / "m.gguf")
    assert config.architecture() == model.config.architecture()
    assert read_config(tmp_path / "m.gguf").architecture() == model.config.architecture()
    assert set(loaded) == set(state) and ("output.weight" in loaded) != tied
    for name, tensor in state.items():
        if tensor.dim() == 2:  # the matrices keep their dtype bit for bit
            assert loaded[name].dtype == dtype and torch.equal(loaded[name], tensor), name
        else:  # llama.cpp keeps norms in F32, which holds every fp16/bf16 value exactly
            assert loaded[name].dtype == torch.float32 and torch.equal(loaded[name], tensor.float()), name


def test_q8_0_export_is_the_packages_quantisation(tmp_path: Path) -> None:
    model = tiny()
    save_gguf(model.config, model.state_dict(), tmp_path / "q.gguf", tensor_type="Q8_0")
    _, loaded = load_gguf(tmp_path / "q.gguf")
    w = model.state_dict()["layers.0.attention.wq.weight"]
    expected = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0),
                                      gguf.GGMLQuantizationType.Q8_0)
    assert torch.equal(loaded["layers.0.attention.wq.weight"], torch.from_numpy(expected))
    assert (loaded["layers.0.attention.wq.weight"] - w).abs().max() < w.abs().max() / 100


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K"])
def test_every_quantised_type_is_dequantised(tmp_path: Path, kind: str) -> None:
    # A file whose matrices are stored as `kind`: quantised by the package where it can, else random
    # blocks (scales kept finite) for the K-quants llama.cpp writes; read back = the package's dequantise.
    model = tiny()
    qtype = gguf.GGMLQuantizationType[kind]
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    config = model.config
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(tmp_path / "k.gguf"), arch="llama")
    for key, value in {"context_length": 256, "embedding_length": 64, "block_count": 2, "feed_forward_length": 192,
                       "head_count": 4, "head_count_kv": 2, "layer_norm_rms_eps": 1e-5}.items():
        getattr(writer, f"add_{key}")(value)
    writer.add_vocab_size(config.vocab_size)
    expected = {}
    for name, tensor in model.state_dict().items():
        if tensor.dim() == 1 or tensor.shape[1] % block:
            writer.add_tensor(ours_to_gguf_key(name), tensor.numpy())
            expected[name] = tensor
            continue
        try:
            raw = gguf.quants.quantize(tensor.numpy(), qtype)
        except NotImplementedError:
            raw = rng.integers(0, 256, (tensor.shape[0], tensor.shape[1] // block * nbytes), dtype=np.uint8)
            # every K-quant block ends (Q6_K) or starts (Q4_K) with fp16 scales; make them small and finite
            scales = np.float16(0.01).view(np.uint8)
            cols = raw.reshape(-1, nbytes)
            cols[:, -2:] = scales if kind == "Q6_K" else cols[:, -2:]
            if kind == "Q4_K":
                cols[:, 0:2], cols[:, 2:4] = scales, scales
        writer.add_tensor(ours_to_gguf_key(name), raw, raw_dtype=qtype)
        expected[name] = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _, loaded = load_gguf(tmp_path / "k.gguf")
    for name, tensor in expected.items():
        assert torch.isfinite(loaded[name]).all() and torch.equal(loaded[name], tensor.float()), name


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_export_loads_in_transformers_gguf_loader(tmp_path: Path, tied: bool) -> None:
    transformers = pytest.importorskip("transformers")
    model = tiny(tied)
    save_gguf(model.config, model.state_dict(), tmp_path / "m.gguf", tensor_type="F32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    assert theirs.config.tie_word_embeddings == tied
    x = torch.randint(0, 2048, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(x).logits, model(x), atol=1e-4, rtol=0)


def test_convert_cli_to_gguf_and_back_is_exact(tmp_path: Path) -> None:
    model = tiny(tied=True)
    save_hf(model.config, model.state_dict(), tmp_path / "hf")
    gguf_path = tmp_path / "out" / "m.gguf"
    assert cli_convert(["--from", "hf", "--to", "gguf", "--gguf-type", "F32", str(tmp_path / "hf"), str(gguf_path)]) == 0
    assert cli_convert(["--from", "gguf", "--to", "hf", str(gguf_path), str(tmp_path / "back")]) == 0
    back = load_model(tmp_path / "back")
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    assert cli_convert(["--from", "gguf", "--to", "lightning", str(gguf_path), str(tmp_path / "ckpt")]) == 0
    assert torch.equal(load_model(tmp_path / "ckpt" / "model.ckpt").tok_embeddings.weight, model.tok_embeddings.weight)


def test_init_from_accepts_a_gguf(tmp_path: Path) -> None:
    model = tiny(tied=True)
    save_gguf(model.config, model.state_dict(), tmp_path / "m.gguf", tensor_type="F32")
    config = build_config(None, init_from=str(tmp_path / "m.gguf"))
    loaded = build_transformer(config, init_from=str(tmp_path / "m.gguf"))
    x = torch.randint(0, 2048, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))


def test_unsupported_gguf_metadata_is_named(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), arch="qwen2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"x.gguf: general.architecture='qwen2'"):
        load_gguf(tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="tensor_type='Q2_K'"):
        save_gguf(tiny().config, tiny().state_dict(), tmp_path / "y.gguf", tensor_type="Q2_K")


def test_llama3_rope_scaling_travels_as_llama_cpp_rope_factors(tmp_path: Path) -> None:
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    model = tiny(dim=64, n_heads=2, n_kv_heads=1, head_dim=64, rope_scaling=scaling)
    save_gguf(model.config, model.state_dict(), tmp_path / "l3.gguf", tensor_type="F32")
    config, state = load_gguf(tmp_path / "l3.gguf")
    assert config.rope_scaling == scaling and "rope_freqs.weight" not in state
    back = Transformer(config).eval()
    back.load_state_dict(state)
    x = torch.randint(0, 2048, (1, 200))  # past original_max_position_embeddings
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    # Llama 3.1's own numbers (head_dim 128, theta 500,000, 8,192 original context) are recovered too.
    llama31 = LlamaConfig(dim=4096, n_heads=32, rope_theta=500000.0, rope_scaling={**scaling,
                          "original_max_position_embeddings": 8192})
    assert llama3_scaling_from_factors(llama3_rope_factors(llama31), llama31, "t") == llama31.rope_scaling
