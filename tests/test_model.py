from __future__ import annotations

import pytest
import torch

from llama2_lightning import LlamaConfig, Transformer
from llama2_lightning.model import rope_frequencies

PAPER_COUNTS = {
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-34b": 33_743_970_304,
    "llama2-70b": 68_976_648_192,
}


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_paper_presets_have_paper_parameter_counts(name: str) -> None:
    with torch.device("meta"):
        model = Transformer.from_name(name)
    assert model.num_parameters() == PAPER_COUNTS[name]
    assert all(p.is_meta for p in model.parameters())
    assert model.config.vocab_size == 32000 and model.config.max_seq_len == 4096


def test_70b_shape() -> None:
    cfg = LlamaConfig.from_name("llama2-70b")
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim, cfg.n_layers) == (64, 8, 28672, 80)


def test_config_rejects_bad_head_grouping() -> None:
    with pytest.raises(ValueError, match=r"n_heads \(6\) must be a multiple of n_kv_heads \(4\)"):
        LlamaConfig(dim=48, n_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError, match="Unknown preset 'nope'"):
        LlamaConfig.from_name("nope")


def test_meta_params_round_trip(tmp_path) -> None:
    import json

    cfg = LlamaConfig.from_name("llama2-70b")
    (tmp_path / "params.json").write_text(json.dumps({**cfg.to_meta_params(), "vocab_size": -1}))
    assert LlamaConfig.from_meta_params(tmp_path / "params.json") == cfg
    (tmp_path / "bad.json").write_text(json.dumps({"dim": 8, "n_heads": 2, "typo_key": 1}))
    with pytest.raises(ValueError, match="typo_key"):
        LlamaConfig.from_meta_params(tmp_path / "bad.json")


def test_meta_device_build_then_materialise_matches_eager() -> None:
    cfg = LlamaConfig.from_name("tiny")
    torch.manual_seed(0)
    eager = Transformer(cfg)
    with torch.device("meta"):
        lazy = Transformer(cfg)
    lazy.to_empty(device="cpu")
    for module in lazy.modules():  # what Lightning's materialisation does
        if callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
    torch.testing.assert_close(lazy.rope_table, eager.rope_table, rtol=0, atol=0)
    lazy.load_state_dict(eager.state_dict(), strict=True)
    x = torch.randint(0, cfg.vocab_size, (2, 11))
    torch.testing.assert_close(lazy(x), eager(x))


def test_rope_table_survives_bf16_cast() -> None:
    model = Transformer.from_name("tiny").to(torch.bfloat16)
    assert model.output.weight.dtype == torch.bfloat16 and model.rope_table.dtype == torch.float32
    ref = rope_frequencies(model.config.max_seq_len, model.config.head_dim, model.config.rope_theta)
    torch.testing.assert_close(model.rope_table, torch.view_as_real(ref), rtol=0, atol=0)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_kv_cache_decoding_equals_full_forward(n_kv_heads: int) -> None:
    torch.manual_seed(0)
    model = Transformer(LlamaConfig.from_name("tiny", n_kv_heads=n_kv_heads)).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(tokens)  # (B, T, V)
        model.setup_kv_cache(batch_size=2, max_seq_len=32)
        # prefill 5 tokens, then 7 single-token steps
        steps = [model(tokens[:, :5], input_pos=torch.arange(5))]
        for t in range(5, 12):
            steps.append(model(tokens[:, t : t + 1], input_pos=torch.tensor([t])))
        model.reset_kv_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert not model.has_kv_cache


def test_forward_hidden_feeds_output_head() -> None:
    model = Transformer.from_name("tiny")
    tokens = torch.randint(0, model.config.vocab_size, (3, 7))
    hidden = model.forward_hidden(tokens)
    assert hidden.shape == (3, 7, model.config.dim)
    torch.testing.assert_close(model.output(hidden), model(tokens))


def test_training_forward_is_causal() -> None:
    torch.manual_seed(0)
    model = Transformer.from_name("tiny")
    a = torch.randint(0, model.config.vocab_size, (1, 10))
    b = a.clone()
    b[0, 6:] = (b[0, 6:] + 1) % model.config.vocab_size
    with torch.no_grad():
        la, lb = model(a), model(b)
    torch.testing.assert_close(la[:, :6], lb[:, :6])
    assert not torch.allclose(la[:, 6:], lb[:, 6:])


def test_state_dict_uses_meta_names() -> None:
    keys = set(Transformer.from_name("tiny").state_dict())
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    for i in range(2):
        expected |= {f"layers.{i}.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")}
        expected |= {f"layers.{i}.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}
        expected |= {f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"}
    assert keys == expected


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = Transformer.from_name("tiny")
    tokens = torch.randint(0, model.config.vocab_size, (2, 16))

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        model.activation_checkpointing = checkpointing
        model(tokens).float().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, recomputed = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], msg=name)
    assert set(model.state_dict()) == set(Transformer.from_name("tiny").state_dict())  # names unchanged


def test_last_only_logits_equal_the_last_row() -> None:
    model = Transformer.from_name("tiny")
    tokens = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, last_only=True), model(tokens)[:, -1:])


def test_rope_spelt_out_for_compile_equals_the_complex_rotation(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under torch.compile apply_rope takes its real-arithmetic branch; both branches must rotate alike,
    # forward and backward, in fp32 and bf16, with one shared table and with per-row positions.
    from llama2_lightning.model import apply_rope

    table = torch.view_as_real(rope_frequencies(32, 16, 10000.0))  # (S, D/2, 2)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [7, 8, 9, 30, 31, 2]])
    for dtype in (torch.float32, torch.bfloat16):
        for rope in (table[:6][None], table[positions]):  # (1, T, D/2, 2) and (B, T, D/2, 2)
            x = torch.randn(2, 6, 3, 16, dtype=dtype)
            w = torch.randn(2, 6, 3, 16, dtype=dtype)

            def rotate(compiling: bool) -> tuple[torch.Tensor, torch.Tensor]:
                monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
                leaf = x.clone().requires_grad_()
                out = apply_rope(leaf, rope)
                (out.float() * w.float()).sum().backward()
                return out.detach(), leaf.grad

            (complex_out, complex_grad), (real_out, real_grad) = rotate(False), rotate(True)
            assert real_out.dtype == dtype and not torch.equal(real_out, x)  # it rotated
            torch.testing.assert_close(real_out, complex_out)
            torch.testing.assert_close(real_grad, complex_grad)
    monkeypatch.undo()


def test_compiled_block_matches_eager_block() -> None:
    # The blocks as `bench_train --compile` and gpu_check compile them: same loss and gradients.
    torch.manual_seed(0)
    model = Transformer.from_name("tiny")
    tokens = torch.randint(0, model.config.vocab_size, (2, 16))

    def loss_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss = model(tokens).float().pow(2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    eager_loss, eager_grads = loss_and_grads()
    for block in model.layers:
        block.compile()
    compiled_loss, compiled_grads = loss_and_grads()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
