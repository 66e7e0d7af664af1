from __future__ import annotations

import pytest
import torch

from llama2_lightning import LlamaConfig, Transformer
from llama2_lightning.generation import generate, release_compiled_decode, sample_next


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(LlamaConfig.from_name("tiny")).eval()


PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10, 11]]


def test_batched_mixed_lengths_equal_each_prompt_alone(model: Transformer) -> None:
    batch = generate(model, PROMPTS, max_new_tokens=12, temperature=0.0)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], max_new_tokens=12, temperature=0.0)
        assert batch.tokens[i].tolist() == alone.tokens[0].tolist()
        torch.testing.assert_close(batch.logprobs[i], alone.logprobs[0], atol=1e-5, rtol=1e-5)


def test_logprobs_match_full_forward(model: Transformer) -> None:
    out = generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=3)
    for i, prompt in enumerate(PROMPTS):
        new = out.tokens[i].tolist()
        seq = torch.tensor([prompt + new])
        with torch.no_grad():
            logp = torch.log_softmax(model(seq), dim=-1)[0, len(prompt) - 1 : -1]  # (N, V)
        expected = logp.gather(-1, torch.tensor(new)[:, None]).squeeze(-1)
        torch.testing.assert_close(out.logprobs[i], expected, atol=1e-5, rtol=1e-5)


def test_seed_makes_sampling_reproducible(model: Transformer) -> None:
    a = generate(model, PROMPTS, 10, temperature=1.0, seed=7)
    b = generate(model, PROMPTS, 10, temperature=1.0, seed=7)
    c = generate(model, PROMPTS, 10, temperature=1.0, seed=8)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)


def test_top_k_one_and_tiny_top_p_are_greedy(model: Transformer) -> None:
    greedy = generate(model, PROMPTS, 10, temperature=0.0)
    assert torch.equal(generate(model, PROMPTS, 10, temperature=1.0, top_k=1, seed=1).tokens, greedy.tokens)
    assert torch.equal(generate(model, PROMPTS, 10, temperature=1.0, top_p=1e-6, seed=1).tokens, greedy.tokens)


def test_top_k_and_top_p_restrict_the_support() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=gen).tolist()) == {0, 1}
    # probs ~ .64 .24 .09 .03 .01: top_p=0.8 keeps exactly the first two (0.64 < 0.8 <= 0.88)
    assert set(sample_next(logits, 1.0, top_p=0.8, generator=gen).tolist()) == {0, 1}
    # the full distribution reaches all five tokens
    assert set(sample_next(logits, 1.0, generator=gen).tolist()) == {0, 1, 2, 3, 4}


def test_rows_stop_at_their_own_eos(model: Transformer) -> None:
    greedy = generate(model, PROMPTS, 10, temperature=0.0)
    eos = int(greedy.tokens[1, 3])  # make row 1's 4th token the EOS
    out = generate(model, PROMPTS, 10, temperature=0.0, eos_id=eos, pad_id=-1)
    for i in range(len(PROMPTS)):
        row = greedy.tokens[i].tolist()
        stop = row.index(eos) + 1 if eos in row else len(row)
        assert out.lengths[i] == stop
        assert out.tokens[i, :stop].tolist() == row[:stop]
        assert (out.tokens[i, stop:] == -1).all() and (out.logprobs[i, stop:] == 0).all()
    assert out.as_lists()[1][-1] == eos


def test_generation_restores_mode_and_releases_cache(model: Transformer) -> None:
    model.train()
    generate(model, PROMPTS, 3, temperature=0.0)
    assert model.training and not model.has_kv_cache
    model.eval()


def test_too_long_request_is_a_clear_error(model: Transformer) -> None:
    with pytest.raises(ValueError, match="exceeds max_seq_len=256"):
        generate(model, [[1] * 200], max_new_tokens=100)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_greedy_equals_transformers_generate(tmp_path, n_kv_heads: int) -> None:
    transformers = pytest.importorskip("transformers")
    from llama2_lightning.checkpoint import save_hf

    torch.manual_seed(n_kv_heads)
    ours = Transformer(LlamaConfig.from_name("tiny", n_kv_heads=n_kv_heads)).eval()
    save_hf(ours.config, ours.state_dict(), tmp_path)
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    prompt = torch.randint(3, ours.config.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(prompt), theirs(prompt).logits, atol=1e-4, rtol=1e-4)
        expected = theirs.generate(prompt, do_sample=False, max_new_tokens=24, min_new_tokens=24,
                                   pad_token_id=0, eos_token_id=None)[0, 9:]
    got = generate(ours, prompt.tolist(), max_new_tokens=24, temperature=0.0)
    assert got.tokens[0].tolist() == expected.tolist()


# ---------------------------------------------------------------------------------------------- fast paths
def test_prefix_reuse_logits_equal_plain_per_row_prefill(model: Transformer) -> None:
    k = 3
    repeated = [p for p in PROMPTS for _ in range(k)]
    plain = generate(model, repeated, 9, temperature=1.0, seed=5, output_logits=True)
    reused = generate(model, PROMPTS, 9, temperature=1.0, seed=5, num_samples=k, output_logits=True)
    assert reused.logits is not None and plain.logits is not None
    assert reused.logits.shape == (len(PROMPTS) * k, 9, model.config.vocab_size)
    # Same logits at every step, hence (same generator stream) the same samples, row for row.
    torch.testing.assert_close(reused.logits, plain.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(reused.tokens, plain.tokens)
    torch.testing.assert_close(reused.logprobs, plain.logprobs, atol=1e-5, rtol=1e-5)
    # The K samples of one prompt differ from each other (they are samples, not copies).
    assert not torch.equal(reused.tokens[0], reused.tokens[1])


def test_prefix_reuse_greedy_rows_are_identical_to_plain(model: Transformer) -> None:
    plain = generate(model, PROMPTS, 12, temperature=0.0)
    reused = generate(model, PROMPTS, 12, temperature=0.0, num_samples=4)
    assert torch.equal(reused.tokens, plain.tokens.repeat_interleave(4, dim=0))
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        generate(model, PROMPTS, 2, num_samples=0)


def test_output_logits_are_the_full_forward_logits(model: Transformer) -> None:
    out = generate(model, PROMPTS, 6, temperature=0.0, output_logits=True)
    assert out.logits is not None
    for i, prompt in enumerate(PROMPTS):
        seq = torch.tensor([prompt + out.tokens[i].tolist()])
        with torch.no_grad():
            expected = model(seq)[0, len(prompt) - 1 : -1]  # (N, V)
        torch.testing.assert_close(out.logits[i], expected, atol=1e-4, rtol=1e-4)
    assert generate(model, PROMPTS, 2, temperature=0.0).logits is None


def _compiled_or_skip(fn):
    """Run ``fn``; skip (not fail) where inductor cannot build C++ on this machine."""
    try:
        return fn()
    except Exception as err:  # inductor wraps compiler failures in several exception types
        names = {type(e).__name__ for e in (err, err.__cause__) if e is not None}
        if names & {"BackendCompilerFailed", "CppCompileError", "InvalidCxxCompiler", "CalledProcessError"}:
            pytest.skip(f"torch.compile (inductor) cannot compile here: {err}")
        raise


def test_compiled_decode_matches_eager_and_follows_weight_updates() -> None:
    torch.manual_seed(1)
    model = Transformer(LlamaConfig.from_name("tiny")).eval()
    eager = generate(model, PROMPTS, 10, temperature=0.0, output_logits=True)
    compiled = _compiled_or_skip(lambda: generate(model, PROMPTS, 10, temperature=0.0, output_logits=True,
                                                  compile=True))
    torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(compiled.tokens, eager.tokens)
    # Same shapes, other prompts: the kept cache and compiled step are reused, not stale.
    others = [[p[-1] + 1] + p[:-1] for p in PROMPTS]
    torch.testing.assert_close(generate(model, others, 10, temperature=0.0, output_logits=True, compile=True).logits,
                               generate(model, others, 10, temperature=0.0, output_logits=True).logits,
                               atol=1e-4, rtol=1e-4)
    # Longest prompts of 9 and 13 tokens share the 16-slot bucket: no new graph for the second batch.
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    longer = [p + [12, 13, 14, 15] for p in PROMPTS]  # longest 13
    torch.testing.assert_close(generate(model, longer, 10, temperature=0.0, output_logits=True, compile=True).logits,
                               generate(model, longer, 10, temperature=0.0, output_logits=True).logits,
                               atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs
    # Another batch size compiles once; coming back to the first finds its own cache and graph again.
    generate(model, PROMPTS[:2], 10, temperature=0.0, compile=True)
    graphs = counters["stats"]["unique_graphs"]
    generate(model, longer, 10, temperature=0.0, compile=True)
    assert counters["stats"]["unique_graphs"] == graphs
    step = model.__dict__["_compiled_decode"][1]
    assert sorted(key[0][0] for key in step.caches) == [2, 3]  # one kept cache per batch size
    # The CPU step freezes the weights: an in-place update (an optimiser step) must rebuild it.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    updated = generate(model, PROMPTS, 10, temperature=0.0, output_logits=True)
    assert not torch.allclose(updated.logits, eager.logits, atol=1e-2)
    torch.testing.assert_close(generate(model, PROMPTS, 10, temperature=0.0, output_logits=True, compile=True).logits,
                               updated.logits, atol=1e-4, rtol=1e-4)
    assert not model.has_kv_cache
    release_compiled_decode(model)
    assert "_compiled_decode" not in model.__dict__


def test_prompt_bucket_is_the_next_power_of_two_within_the_context() -> None:
    from llama2_lightning.generation import prompt_bucket

    assert [prompt_bucket(n, 10, 2048) for n in (1, 2, 5, 9, 16, 17, 100)] == [1, 2, 8, 16, 16, 32, 128]
    assert prompt_bucket(100, 20, 140) == 120  # the bucket stops where the context ends
    assert prompt_bucket(130, 20, 140) == 130  # never shorter than the prompt (generate then refuses)


def test_rlhf_rollout_prefills_each_prompt_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import llama2_lightning.rlhf.rollout as rollout_file
    from llama2_lightning.modules.rlhf import RLHFModule
    from llama2_lightning.reward_functions import LengthRuleReward
    from llama2_lightning.tokenizer import Tokenizer

    module = RLHFModule(model="tiny", reward=LengthRuleReward(target_length=4), max_new_tokens=6)
    module.configure_model()
    module.tokenizer = Tokenizer("data/tokenizer.model")
    calls = []
    real_generate = rollout_file.generate

    def spy(model, prompts, *args, **kwargs):
        calls.append((len(prompts), kwargs.get("num_samples", 1)))
        return real_generate(model, prompts, *args, **kwargs)

    monkeypatch.setattr(rollout_file, "generate", spy)
    batch = {"prompt_ids": PROMPTS, "messages": [[] for _ in PROMPTS], "is_safety": torch.tensor([0, 1, 0]),
             "index": torch.tensor([7, 8, 9])}
    rollout = module.rollout(batch, seed=3, temperature=1.0, num_samples=4)
    assert calls == [(3, 4)]  # three distinct prompts prefilled, four samples each
    expected = real_generate(module.model, [p for p in PROMPTS for _ in range(4)], 6, temperature=1.0,
                             eos_id=module.tokenizer.eos_id, pad_id=module.tokenizer.pad_id, seed=3)
    assert rollout.answer_ids == expected.as_lists()
    assert rollout.prompt_ids == [p for p in PROMPTS for _ in range(4)]
    assert rollout.index.tolist() == [7] * 4 + [8] * 4 + [9] * 4
