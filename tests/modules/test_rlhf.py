"""RLHF stage: rewards, rollouts, PPO and rejection sampling on a tiny random policy, exact resume, configs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
import yaml

from paths import ROOT, TOKENIZER

from llama2_lightning import LlamaConfig, Transformer
from llama2_lightning.callbacks.ppo import PPOCallback
from llama2_lightning.callbacks.rejection_sampling import RejectionSamplingCallback
from llama2_lightning.checkpoint import load_checkpoint
from llama2_lightning.cli import lightning_cli
from llama2_lightning.data.prompts import PromptDataModule
from llama2_lightning.generation import generate
from llama2_lightning.losses import IGNORE_INDEX
from llama2_lightning.modules.args import OptimizerArgs
from llama2_lightning.modules.rlhf import RLHFModule
from llama2_lightning.reward_functions import LengthRuleReward, Llama2DualReward, RewardModelReward, TokenRuleReward
from llama2_lightning.reward_models import score_ids
from llama2_lightning.rlhf.experience import ExperienceCallback, SFTExperience
from llama2_lightning.rlhf.kl import kl_penalty
from llama2_lightning.rlhf.reward_shaping import llama2_reward, logit, whiten_rewards
from llama2_lightning.scalar_model import ScalarModel
from llama2_lightning.tokenizer import Tokenizer

CONFIGS = sorted((ROOT / "configs" / "rlhf").glob("*.yaml"))
ON_ONE_CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.strategy=auto"]
PAPER_COUNTS = {"llama2-7b": 6_738_415_616, "llama2-70b": 68_976_648_192}
# The rule the tiny random policy learns: 256 of its 2,048 ids (an eighth, so it starts near 0.125).
TARGETS = list(range(300, 556))
NEW_TOKENS = 8


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    # The tiny model's matmuls are microseconds: a second thread only adds synchronisation, which on
    # shared CI cores costs more than the work itself.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write_rm(path: Path, seed: int) -> Path:
    """A random tiny reward model in RewardModule's checkpoint layout."""
    torch.manual_seed(seed)
    rm = ScalarModel.from_config(LlamaConfig.from_name("tiny"))
    state = {f"model.{k}": v for k, v in rm.state_dict().items()}
    torch.save({"state_dict": state, "llama_config": rm.config.to_dict(),
                "reward_model": {"trunk_prefix": "model.trunk.", "head_key": "model.head.score.weight", "pad_id": 0}},
               path)
    return path


@pytest.fixture(scope="module")
def rm_ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("rms")
    return {"helpful": _write_rm(d / "helpful.ckpt", 1), "safety": _write_rm(d / "safety.ckpt", 2)}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    verbs = ["Tell me of", "Speak of", "Sing of", "Write of", "Think of", "Dream of", "Ask of", "Weep for"]
    nouns = ["the king", "the queen", "my lord", "the sea", "love", "war", "the night", "thy heart"]
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{v} {n}.", "is_safety": n == "war"}) + "\n"
                            for v in verbs for n in nouns))
    return path


def prompt_data(prompts_file: Path, batch_size: int = 16) -> PromptDataModule:
    return PromptDataModule(sources=[{"path": str(prompts_file), "format": "prompts"}], tokenizer_path=str(TOKENIZER),
                            max_prompt_len=32, batch_size=batch_size, val_fraction=0.25, seed=0)


def rlhf_module(tiny_ckpt: Path, reward: Any = None, **kwargs: Any) -> RLHFModule:
    kwargs.setdefault("max_new_tokens", NEW_TOKENS)
    return RLHFModule(init_from=str(tiny_ckpt), reward=reward or TokenRuleReward(target_ids=TARGETS), **kwargs)


# ------------------------------------------------------------------------------------------- rewards


def test_token_rule_reward_counts_target_tokens_without_eos(tok: Tokenizer) -> None:
    reward = TokenRuleReward(targets=["the", "love"])
    reward.setup(torch.device("cpu"), tok)
    the, love = tok.encode("the"), tok.encode("love")
    assert len(the) == len(love) == 1
    other = tok.encode("sword")
    answers = [[*the, *other, tok.eos_id], [*the, *love], [tok.eos_id], [*other, *other, *other, *love]]
    r = reward([], [""] * 4, [[1]] * 4, answers, torch.zeros(4, dtype=torch.bool))
    assert r.tolist() == [0.5, 1.0, 0.0, 0.25]
    with pytest.raises(ValueError, match="give targets"):
        TokenRuleReward()


def test_length_rule_reward() -> None:
    reward = LengthRuleReward(target_length=4, eos_id=2)
    r = reward([], [""] * 3, [[1]] * 3, [[5, 5, 5, 5, 2], [5, 5], [5] * 8], torch.zeros(3, dtype=torch.bool))
    assert r.tolist() == [0.0, -0.5, -1.0]


def _dual(rm_ckpts: dict[str, Path], **kwargs: Any) -> Llama2DualReward:
    return Llama2DualReward(str(rm_ckpts["helpful"]), str(rm_ckpts["safety"]), **kwargs)


def _pairs(tok: Tokenizer, n: int = 8) -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(3)
    prompts = [tok.encode(f"[INST] question {i} [/INST]", bos=True) for i in range(n)]
    lengths = torch.randint(1, 9, (n,), generator=g).tolist()
    answers = [torch.randint(3, 2048, (k,), generator=g).tolist() + [tok.eos_id] for k in lengths]
    return prompts, answers


def test_dual_reward_is_the_gated_logit_of_independent_scores(rm_ckpts: dict[str, Path], tok: Tokenizer) -> None:
    prompts, answers = _pairs(tok)
    seqs = [p + a for p, a in zip(prompts, answers)]
    # Independent: the scoring module's own padded batches, then the paper's gate written out.
    from llama2_lightning.reward_models import load_reward_model

    helpful, _ = load_reward_model(rm_ckpts["helpful"])
    safety, _ = load_reward_model(rm_ckpts["safety"])
    r_h, r_s = torch.sigmoid(score_ids(helpful, seqs, 0)), torch.sigmoid(score_ids(safety, seqs, 0))
    threshold = float(r_s.median())  # some answers fall under the gate, some not
    is_safety = torch.tensor([True, False] * 4)
    reward = _dual(rm_ckpts, threshold=threshold, batch_size=3)
    reward.setup(torch.device("cpu"), tok)
    parts = reward.score([], [""] * 8, prompts, answers, is_safety)
    gate = is_safety | (r_s < threshold)
    assert 0 < int((~is_safety & gate).sum()) < int((~is_safety).sum())  # both branches taken
    expected = torch.where(gate, r_s, r_h)
    torch.testing.assert_close(parts["helpful"], r_h)
    torch.testing.assert_close(parts["safety"], r_s)
    torch.testing.assert_close(parts["reward"], logit(expected), atol=1e-5, rtol=1e-5)
    assert parts["safety_gate"].tolist() == gate.float().tolist()
    # what the PPO callback does next (WHITEN) is the paper's sequence reward
    torch.testing.assert_close(whiten_rewards(parts["reward"]), llama2_reward(r_h, r_s, is_safety, threshold),
                               atol=1e-5, rtol=1e-5)
    single = RewardModelReward(str(rm_ckpts["helpful"]))
    single.setup(torch.device("cpu"), tok)
    torch.testing.assert_close(single([], [""] * 8, prompts, answers, is_safety), torch.logit(r_h),
                               atol=1e-4, rtol=1e-4)


def test_reward_models_frozen_in_bf16_and_int8(rm_ckpts: dict[str, Path], tok: Tokenizer) -> None:
    prompts, answers = _pairs(tok)
    is_safety = torch.zeros(8, dtype=torch.bool)
    full = _dual(rm_ckpts)
    full.setup(torch.device("cpu"), tok)
    ref = full.score([], [""] * 8, prompts, answers, is_safety)
    half = _dual(rm_ckpts, frozen_dtype="bfloat16")
    half.setup(torch.device("cpu"), tok)
    for model in (half.helpful, half.safety):
        assert not model.training and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())
    got = half.score([], [""] * 8, prompts, answers, is_safety)
    assert got["helpful"].dtype == torch.float32
    torch.testing.assert_close(got["helpful"], ref["helpful"], atol=0.02, rtol=0)
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    q = _dual(rm_ckpts, load_in_8bit=True)
    q.setup(torch.device("cpu"), tok)  # bitsandbytes >= 0.45 quantises on CPU
    # wq wk wv wo w1 w2 w3 in each of the 2 layers
    assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in q.helpful.modules()) == 7 * 2
    got = q.score([], [""] * 8, prompts, answers, is_safety)
    torch.testing.assert_close(got["helpful"], ref["helpful"], atol=0.03, rtol=0)
    assert not torch.equal(got["helpful"], ref["helpful"])  # really quantised


# ------------------------------------------------------------------------------------------ rollouts


def _ready_module(tiny_ckpt: Path, tok: Tokenizer, **kwargs: Any) -> RLHFModule:
    module = rlhf_module(tiny_ckpt, **kwargs)
    module.experience_callback = PPOCallback()  # what setup finds in a Trainer: PPO builds a value model
    module.configure_model()
    module.tokenizer = tok
    return module


def test_rollout_layout_matches_generation_and_kl_starts_at_zero(tiny_ckpt: Path, tok: Tokenizer,
                                                                 prompts_file: Path) -> None:
    dm = prompt_data(prompts_file, batch_size=6)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    module = _ready_module(tiny_ckpt, tok)
    rollout = module.rollout(batch, seed=11)
    # the same draw, independently: generate() on the prompts with the same seed
    model = Transformer.from_name("tiny")
    model.load_state_dict(load_checkpoint(tiny_ckpt)[1])
    out = generate(model, batch["prompt_ids"], NEW_TOKENS, eos_id=tok.eos_id, pad_id=tok.pad_id,
                   seed=11)
    assert rollout.answer_ids == out.as_lists()
    ev = module.evaluate_rollout(rollout)
    for i, (p, a) in enumerate(zip(rollout.prompt_ids, rollout.answer_ids)):
        assert rollout.tokens[i, : len(p) + len(a)].tolist() == p + a
        cols = rollout.action_mask[i].nonzero().flatten().tolist()
        assert cols == list(range(len(p) - 1, len(p) + len(a) - 1))  # column t emits tokens[t + 1]
        # training-forward log-probs of the sampled tokens == generation's (KV cache) log-probs
        torch.testing.assert_close(ev["logprobs"][i, cols], out.logprobs[i, : len(a)], atol=1e-4, rtol=1e-4)
    # pi_0 is the initial policy: the KL is exactly 0 before any update
    assert torch.equal(ev["logprobs"], ev["ref_logprobs"])
    assert ev["values"].shape == rollout.action_mask.shape


def test_compiled_rollouts_sample_what_eager_rollouts_sample(tiny_ckpt: Path, tok: Tokenizer, prompts_file: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # compile_rollouts: generate(compile=True) with its prompt bucket, the same seeded draws; the
    # second batch has other prompt lengths.
    dm = prompt_data(prompts_file, batch_size=6)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    shorter = {**batch, "prompt_ids": [list(p)[1:] for p in batch["prompt_ids"]]}
    eager, compiled = _ready_module(tiny_ckpt, tok), _ready_module(tiny_ckpt, tok, compile_rollouts=True)
    for seed, batch in ((11, batch), (12, shorter)):
        want = eager.rollout(batch, seed=seed, num_samples=2)
        got = compiled.rollout(batch, seed=seed, num_samples=2)
        assert got.answer_ids == want.answer_ids and torch.equal(got.tokens, want.tokens)
    assert "_compiled_decode" in compiled.model.__dict__ and "_compiled_decode" not in eager.model.__dict__
    # A sharded policy is gathered into new storage for every rollout: refused, with the reason.
    import llama2_lightning.rlhf.rollout as rollout_file

    monkeypatch.setattr(rollout_file, "is_sharded", lambda model: True)
    with pytest.raises(ValueError, match="compile_rollouts=True. needs an unsharded policy"):
        compiled.rollout(batch, seed=13)
    eager.rollout(batch, seed=13)  # the same check leaves uncompiled rollouts alone


def test_bf16_reference_is_frozen_and_close_to_the_policy(tiny_ckpt: Path, tok: Tokenizer, prompts_file: Path) -> None:
    dm = prompt_data(prompts_file, batch_size=4)
    dm.setup()
    module = _ready_module(tiny_ckpt, tok, frozen_dtype="bfloat16")
    module.train()  # what Lightning does at fit start: pi_0 must stay in eval mode
    ref = module.ref_model
    assert not ref.training and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in ref.parameters())
    rollout = module.rollout(next(iter(dm.train_dataloader())), seed=2)
    ev = module.evaluate_rollout(rollout)
    gap = (ev["logprobs"] - ev["ref_logprobs"])[rollout.action_mask].abs()
    assert 0 < float(gap.max()) < 0.1  # bf16 rounding only: the KL starts slightly above 0


def test_ppo_experience_sums_to_the_papers_reward(tiny_ckpt: Path, tok: Tokenizer, prompts_file: Path) -> None:
    dm = prompt_data(prompts_file, batch_size=8)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    module = _ready_module(tiny_ckpt, tok)
    with torch.no_grad():  # move pi_0 away from the policy so the KL term is not 0
        for p in module.ref_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    beta = 0.3
    callback = PPOCallback(kl_coef=beta, seed=5)
    exp = callback.make_experience(SimpleNamespace(global_rank=0, strategy=SimpleNamespace()), module, batch)
    rollout = module.rollout(batch, seed=exp.seed)
    raw = module.score(rollout)["reward"]
    ev = module.evaluate_rollout(rollout)
    kl = torch.where(rollout.action_mask, kl_penalty(ev["logprobs"], ev["ref_logprobs"]), 0.0).sum(1)
    assert float(kl.abs().sum()) > 0
    # R = WHITEN(reward) - beta * KL, summed over each answer
    torch.testing.assert_close(exp.rewards.sum(1), whiten_rewards(raw) - beta * kl, atol=1e-5, rtol=1e-5)
    assert torch.equal(exp.action_mask, rollout.action_mask)
    adv = exp.advantages[exp.action_mask]
    assert abs(float(adv.mean())) < 1e-5 and abs(float(adv.std()) - 1) < 1e-3  # whitened


def test_sft_experience_trains_on_answer_tokens_only() -> None:
    exp = SFTExperience.from_pairs([[1, 10, 11], [1, 12]], [[20, 21, 2], [22, 2]], pad_id=0, seed=0)
    assert exp.input_ids.tolist() == [[1, 10, 11, 20, 21], [1, 12, 22, 0, 0]]
    I = IGNORE_INDEX  # noqa: E741
    assert exp.labels.tolist() == [[I, I, 20, 21, 2], [I, 22, 2, I, I]]
    assert exp.lengths.tolist() == [5, 3]


# ---------------------------------------------------------------------------------- learning curves


def _fit(tmp_path: Path, tiny_ckpt: Path, prompts_file: Path, callback: L.Callback, iterations: int,
         **module_kwargs: Any) -> tuple[dict[str, float], dict[str, float]]:
    """Held-out metrics of a fresh run before and after ``iterations`` training epochs."""
    L.seed_everything(0)
    dm = prompt_data(prompts_file)
    module = rlhf_module(tiny_ckpt, **module_kwargs)
    trainer = L.Trainer(max_epochs=iterations, accelerator="cpu", devices=1, callbacks=[callback], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, check_val_every_n_epoch=iterations, default_root_dir=tmp_path)
    trainer.validate(module, dm, verbose=False)
    start = {k: float(v) for k, v in trainer.callback_metrics.items()}
    trainer.fit(module, dm)
    end = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return start, end


def test_ppo_raises_the_rule_reward_and_beta_holds_the_kl(tmp_path: Path, tiny_ckpt: Path,
                                                          prompts_file: Path) -> None:
    ppo = dict(optimizer=OptimizerArgs(lr=1e-2), minibatch_size=8, ppo_epochs=2)
    start, small = _fit(tmp_path / "small", tiny_ckpt, prompts_file, PPOCallback(kl_coef=0.01, seed=0), 24, **ppo)
    _, large = _fit(tmp_path / "large", tiny_ckpt, prompts_file, PPOCallback(kl_coef=10.0, seed=0), 24, **ppo)
    print(f"held-out reward {start['val/reward']:.3f} -> {small['val/reward']:.3f} "
          f"(beta 0.01, KL {small['val/kl']:.2f}); beta 10: reward {large['val/reward']:.3f}, KL {large['val/kl']:.2f}")
    assert start["val/kl"] == 0.0 and start["val/reward"] < 0.2
    assert small["val/reward"] > start["val/reward"] + 0.4
    # bounded: finite and below a point mass's KL against the near-uniform random reference
    assert 0 < small["val/kl"] < NEW_TOKENS * math.log(2048)
    # beta large: the policy stays by pi_0 (under half a nat per token), far below the small-beta KL
    assert large["val/kl_k3"] < 0.5 * NEW_TOKENS and large["val/kl"] < small["val/kl"] / 5
    assert large["val/reward"] < small["val/reward"] - 0.3


def test_rejection_sampling_raises_the_rule_reward(tmp_path: Path, tiny_ckpt: Path, prompts_file: Path) -> None:
    callback = RejectionSamplingCallback(num_samples=8, seed=0)
    start, end = _fit(tmp_path, tiny_ckpt, prompts_file, callback, 10, optimizer=OptimizerArgs(lr=3e-3),
                      minibatch_size=8, sft_epochs=2)
    print(f"held-out reward {start['val/reward']:.3f} -> {end['val/reward']:.3f}, pool {end['train/reward_pool']:.3f}")
    assert end["val/reward"] > start["val/reward"] + 0.3
    assert end["train/reward_best_of_k"] >= end["train/reward"]
    assert len(callback.pool) == 48 and callback.round == 10  # every training prompt has its best answer


def test_a_later_round_run_continues_the_pool_and_draws_new_prompts(tmp_path: Path, tiny_ckpt: Path,
                                                                    prompts_file: Path) -> None:
    """RLHF-V2 as its own fit: init_from and pool_from the V1 checkpoint, start_iteration past V1's prompts."""

    class Seen(L.Callback):
        def __init__(self) -> None:
            self.indices: list[list[int]] = []

        def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int) -> None:
            self.indices.append(batch["index"].tolist())

    def run(root: Path, init_from: Path, rounds: int, start: int = 0, **cb_kwargs: Any) -> tuple[RejectionSamplingCallback, Seen]:
        L.seed_everything(0)
        callback, seen = RejectionSamplingCallback(num_samples=2, temperature_increment=0.1, seed=0, **cb_kwargs), Seen()
        dm = PromptDataModule(sources=[{"path": str(prompts_file), "format": "prompts"}],
                              tokenizer_path=str(TOKENIZER), max_prompt_len=32, batch_size=8, val_fraction=0.25,
                              seed=0, start_iteration=start)
        module = rlhf_module(init_from, optimizer=OptimizerArgs(lr=1e-3), minibatch_size=8)
        trainer = L.Trainer(max_epochs=rounds, accelerator="cpu", devices=1, callbacks=[callback, seen], logger=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            limit_val_batches=0, default_root_dir=root)
        trainer.fit(module, dm)
        trainer.save_checkpoint(root / "last.ckpt")
        return callback, seen

    v1, seen1 = run(tmp_path / "v1", tiny_ckpt, 2)
    v2, seen2 = run(tmp_path / "v2", tmp_path / "v1" / "last.ckpt", 1, start=2, pool_from=str(tmp_path / "v1" / "last.ckpt"))
    assert v1.round == 2 and v2.round == 3  # the round counter (and so the temperature schedule) continues
    assert v2.temperature_for(2) == pytest.approx(1.2)
    v1_prompts = {i for batch in seen1.indices for i in batch}
    assert len(v1_prompts) == 16 and not set(seen2.indices[0]) & v1_prompts  # V2 draws new prompts
    # the pool holds V1's best answers untouched (its prompts were not sampled again) plus V2's
    assert set(v2.pool) == v1_prompts | set(seen2.indices[0])
    assert all(v2.pool[i] == v1.pool[i] for i in v1_prompts)
    # the V2 policy started from V1's weights, not from the SFT checkpoint
    v1_state = torch.load(tmp_path / "v1" / "last.ckpt", weights_only=True)["state_dict"]
    sft_state = torch.load(tiny_ckpt, weights_only=True)["state_dict"]
    assert not torch.equal(v1_state["model.output.weight"], sft_state["model.output.weight"])
    with pytest.raises(ValueError, match="RejectionSamplingCallback state"):
        RejectionSamplingCallback(pool_from=str(tiny_ckpt)).setup(None, None, "fit")  # type: ignore[arg-type]


class _StubPolicy:
    """Answers whose reward the test chooses, to check the pool without a model."""

    def __init__(self, rewards: list[list[float]]) -> None:
        self.rewards = torch.tensor(rewards)  # (B, K) for the next round
        self.tokenizer = SimpleNamespace(pad_id=0)

    def rollout(self, batch: dict, seed: int, temperature: float, num_samples: int) -> Any:
        B = len(batch["prompt_ids"])
        self.temperature = temperature
        answers = [[100 + round(10 * float(self.rewards[i, k])), 2] for i in range(B) for k in range(num_samples)]
        return SimpleNamespace(prompt_ids=[p for p in batch["prompt_ids"] for _ in range(num_samples)],
                               answer_ids=answers, answer_lengths=torch.full((B * num_samples,), 2))

    def score(self, rollout: Any) -> dict[str, torch.Tensor]:
        return {"reward": self.rewards.flatten()}


def test_rejection_sampling_pool_keeps_each_prompts_best_over_rounds() -> None:
    cb = RejectionSamplingCallback(num_samples=3, temperature=1.0, temperature_increment=0.1, max_temperature=1.15)
    batch = {"prompt_ids": [[1, 5], [1, 6]], "index": torch.tensor([0, 1]), "messages": [], "is_safety": None}
    trainer = SimpleNamespace(global_rank=0, world_size=1, strategy=SimpleNamespace())
    rounds = [[[0.1, 0.5, 0.2], [0.3, 0.1, 0.0]],  # best: prompt 0 -> 0.5, prompt 1 -> 0.3
              [[0.4, 0.2, 0.1], [0.9, 0.2, 0.8]],  # prompt 0 worse than its pool entry, prompt 1 better
              [[0.6, 0.0, 0.0], [0.1, 0.1, 0.1]]]
    temps = []
    for r in rounds:
        stub = _StubPolicy(r)
        exp = cb.make_experience(trainer, stub, batch)
        temps.append(stub.temperature)
        cb.on_train_batch_end(trainer, stub, None, batch, 0)
    assert temps == pytest.approx([1.0, 1.1, 1.15])  # rising, capped
    assert {i: (round(e["reward"], 6), e["round"]) for i, e in cb.pool.items()} == {0: (0.6, 2), 1: (0.9, 1)}
    # what the module trains on: every prompt's best answer so far, answer-only labels
    assert exp.labels.tolist() == [[IGNORE_INDEX, 106, 2], [IGNORE_INDEX, 109, 2]]
    # the pool survives a checkpoint round trip as plain data
    state = cb.state_dict()
    json.dumps(state)
    fresh = RejectionSamplingCallback(num_samples=3)
    fresh.load_state_dict(state)
    assert fresh.pool == cb.pool and fresh.round == 3
    # a pool from another prompt set is refused rather than mixed in
    other = dict(batch, prompt_ids=[[1, 7], [1, 8]])
    with pytest.raises(ValueError, match="different prompt set"):
        fresh.make_experience(trainer, _StubPolicy(rounds[0]), other)


@pytest.mark.parametrize("callbacks", [[], [PPOCallback(), RejectionSamplingCallback()]], ids=["none", "two"])
def test_training_without_an_experience_callback_is_refused(tmp_path: Path, tiny_ckpt: Path, prompts_file: Path,
                                                            callbacks: list[L.Callback]) -> None:
    # The callback present decides the algorithm: none, or two that disagree, is refused by name.
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=callbacks)
    with pytest.raises(ValueError, match="needs exactly one PPOCallback or RejectionSamplingCallback"):
        trainer.fit(rlhf_module(tiny_ckpt), prompt_data(prompts_file))


# ------------------------------------------------------------------------------------ resume & configs


def _csv_rows(root: Path) -> list[dict[str, str]]:
    rows = []
    for f in sorted(root.glob("csv/version_*/metrics.csv")):
        rows += [r for r in csv.DictReader(open(f)) if r.get("train/policy_loss")]
    return rows


def test_killed_ppo_run_resumes_exactly(tmp_path: Path, tiny_ckpt: Path, prompts_file: Path) -> None:
    from recorder import Interrupted

    raw = yaml.safe_load((ROOT / "configs/rlhf/tiny-ppo-rule.yaml").read_text())
    raw["trainer"]["logger"] = [lg for lg in raw["trainer"]["logger"] if lg["class_path"].endswith("CSVLogger")]
    [ppo] = [c for c in raw["trainer"]["callbacks"] if c["class_path"].endswith("PPOCallback")]
    ppo["init_args"]["adaptive_kl"] = {"target": 0.5, "horizon": 64}  # beta is state that must survive too
    raw["model"]["init_args"]["reward"] = {"class_path": "llama2_lightning.reward_functions.TokenRuleReward",
                                           "init_args": {"target_ids": TARGETS}}
    config = tmp_path / "ppo.yaml"
    config.write_text(yaml.safe_dump(raw))

    def run(root: Path, *extra: str) -> None:
        lightning_cli(["fit", "--config", str(config), f"--model.init_args.init_from={tiny_ckpt}",
                       f"--trainer.default_root_dir={root}", "--trainer.max_epochs=4",
                       "--trainer.check_val_every_n_epoch=2", "--trainer.enable_progress_bar=false",
                       "--trainer.enable_model_summary=false",
                       f"--data.init_args.sources=[{{path: {prompts_file}, format: prompts}}]",
                       f"--data.init_args.tokenizer_path={TOKENIZER}", "--data.init_args.max_prompt_len=32",
                       "--data.init_args.val_fraction=0.25", f"--model.init_args.max_new_tokens={NEW_TOKENS}",
                       "--model.init_args.optimizer.lr=1e-2", "--trainer.callbacks+=recorder.Recorder",
                       f"--trainer.callbacks.out_dir={root / 'rec'}", *extra])

    losses = lambda root: json.loads((root / "rec" / "rank0.json").read_text())["losses"]  # noqa: E731
    run(tmp_path / "a")  # uninterrupted: 4 iterations
    full = losses(tmp_path / "a")
    assert len(full) == 4
    # 16 prompts in minibatches of 8, two PPO epochs: 4 optimiser steps per iteration; crash after 2 iterations
    with pytest.raises(Interrupted):
        run(tmp_path / "b", "--trainer.callbacks+=recorder.Interrupt", "--trainer.callbacks.at_step=8")
    assert (tmp_path / "b" / "checkpoints" / "last.ckpt").exists()
    run(tmp_path / "b", "--ckpt_path=last")
    assert losses(tmp_path / "b") == full[2:], "the resumed run must see the same prompts, samples, weights and beta"
    a, b = _csv_rows(tmp_path / "a"), _csv_rows(tmp_path / "b")
    keys = ("epoch", "train/beta", "train/reward", "train/kl", "train/policy_loss", "train/value_loss")
    assert [[r[k] for k in keys] for r in b] == [[r[k] for k in keys] for r in a]  # crashed run's 2 + resumed 2
    assert len({r["train/beta"] for r in a}) == 4  # the adaptive beta moved every iteration
    # the RLHF checkpoint is a policy checkpoint for the next stage (model.* + llama_config)
    config_, state = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.ckpt")
    assert config_ == LlamaConfig.from_name("tiny") and "output.weight" in state


def test_configs_exist() -> None:
    assert {"tiny-ppo-rule", "tiny-ppo", "tiny-rejection-sampling", "llama2-7b-ppo", "llama2-70b-ppo",
            "llama2-7b-rejection-sampling"} <= \
        {p.stem for p in CONFIGS}


def _tiny_overrides(tiny_ckpt: Path, rm_ckpts: dict[str, Path], raw: dict) -> list[str]:
    args = [f"--model.init_args.init_from={tiny_ckpt}"]
    reward = raw["model"]["init_args"]["reward"]
    if reward["class_path"].endswith("Llama2DualReward"):
        args += [f"--model.init_args.reward.init_args.helpful_checkpoint={rm_ckpts['helpful']}",
                 f"--model.init_args.reward.init_args.safety_checkpoint={rm_ckpts['safety']}"]
    if raw["model"]["init_args"].get("value_init_from"):
        args.append(f"--model.init_args.value_init_from={rm_ckpts['helpful']}")
    return args


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_instantiates(path: Path, tmp_path: Path, tiny_ckpt: Path, rm_ckpts: dict[str, Path]) -> None:
    raw = yaml.safe_load(path.read_text())
    args = raw["model"]["init_args"]
    big = args["model"] is not None
    extra = ["--model.init_args.init_from=null"] if big else _tiny_overrides(tiny_ckpt, rm_ckpts, raw)
    cli = lightning_cli(["--config", str(path), *ON_ONE_CPU, f"--trainer.default_root_dir={tmp_path}", *extra],
                        run=False)
    module, hp, opt = cli.model, cli.model.hparams, cli.model.optimizer_args
    assert isinstance(module, RLHFModule) and isinstance(cli.datamodule, PromptDataModule)
    assert tuple(opt.betas) == (0.9, 0.95) and opt.eps == 1e-5 and opt.weight_decay == 0.1 and hp.grad_clip == 1.0
    callbacks = {type(c).__name__: c for c in cli.trainer.callbacks}
    # the one experience callback decides the algorithm, and it is the one the file is named after
    module.experience_callback = ExperienceCallback.find(cli.trainer.callbacks)
    algorithm = "ppo" if isinstance(module.experience_callback, PPOCallback) else "rejection_sampling"
    assert algorithm == ("ppo" if "ppo" in path.stem else "rejection_sampling")
    expected_cb = PPOCallback if algorithm == "ppo" else RejectionSamplingCallback
    assert isinstance(callbacks[expected_cb.__name__], expected_cb)
    assert type(module.reward).__name__ == args["reward"]["class_path"].rsplit(".", 1)[1]
    ckpt = [c for c in cli.trainer.callbacks if type(c).__name__ == "ModelCheckpoint"]
    assert ckpt and all(Path(c.dirpath) == tmp_path / "checkpoints" for c in ckpt)
    if algorithm == "ppo":
        assert hp.clip_eps == 0.2  # paper
        assert "EarlyStopping" in callbacks and callbacks["EarlyStopping"].monitor == "val/reward"
    if big and algorithm == "rejection_sampling":
        rs = callbacks["RejectionSamplingCallback"]
        assert rs.num_samples >= 10 and rs.train_on == "pool"  # paper: 10-100 samples, best of all rounds
        assert rs.temperature_for(0) == 1.0 and rs.temperature_for(10) == pytest.approx(1.3)  # paper, Figure 8
        assert raw["trainer"]["max_epochs"] == 1  # one round per run; the pipeline chains V1..V4
    if big:
        preset = args["model"]
        t = raw["trainer"]
        mesh = t["strategy"]["init_args"]
        # the ranks of a tensor-parallel group share their prompts: data-parallel replicas count
        replicas = mesh["data_parallel_size"]
        assert replicas * mesh["tensor_parallel_size"] == t["num_nodes"] * t["devices"]
        assert mesh["tensor_parallel_size"] == (8 if preset == "llama2-70b" else 1)
        assert opt.lr == 1e-6 and hp.frozen_dtype == "bfloat16"
        assert hp.minibatch_size * replicas == 64  # paper: minibatch 64
    if big and algorithm == "ppo":
        ppo = callbacks["PPOCallback"]
        assert ppo.kl_controller.beta == (0.005 if preset == "llama2-70b" else 0.01)  # paper
        assert hp.ppo_epochs == 1  # paper: one gradient step per minibatch
        assert raw["data"]["init_args"]["batch_size"] == 512  # prompts per iteration (global)
        assert 200 <= t["max_epochs"] <= 400
    if big:
        with torch.device("meta"):
            module.configure_model()
        assert module.model.num_parameters() == PAPER_COUNTS[preset]
        assert all(not p.requires_grad for p in module.ref_model.parameters())
        assert next(module.ref_model.parameters()).dtype == torch.bfloat16
        if algorithm == "ppo":
            assert module.value_model.trunk.config == module.config
        else:
            assert module.value_model is None


@pytest.mark.parametrize("name", ["tiny-ppo-rule", "tiny-ppo", "tiny-rejection-sampling"])
def test_tiny_config_runs_one_iteration(name: str, tmp_path: Path, tiny_ckpt: Path, rm_ckpts: dict[str, Path],
                                        request: pytest.FixtureRequest) -> None:
    path = ROOT / "configs" / "rlhf" / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    if "../shared/data" in path.read_text():
        request.getfixturevalue("shared_data")  # the HH / XSTest prompts: skip cleanly without them
    cli = lightning_cli(["fit", "--config", str(path), *_tiny_overrides(tiny_ckpt, rm_ckpts, raw),
                         "--trainer.fast_dev_run=1", f"--trainer.default_root_dir={tmp_path}",
                         "--data.init_args.batch_size=8", "--data.init_args.val_batch_size=8",
                         f"--model.init_args.max_new_tokens={NEW_TOKENS}", "--trainer.enable_progress_bar=false"])
    m = cli.trainer.callback_metrics
    assert cli.trainer.global_step >= 1
    assert math.isfinite(float(m["train/loss"])) and math.isfinite(float(m["val/reward"]))
    assert math.isfinite(float(m["val/kl"])) and float(m["val/response_length"]) >= 1
    if name != "tiny-rejection-sampling":
        assert float(m["train/clip_fraction"]) >= 0 and "time/generation_s" in m


def test_held_out_samples_go_to_a_wandb_table(tiny_ckpt: Path) -> None:
    from unittest.mock import MagicMock

    from lightning.pytorch.loggers import WandbLogger

    module = rlhf_module(tiny_ckpt)
    logger = MagicMock(spec=WandbLogger)
    module._trainer = SimpleNamespace(is_global_zero=True, sanity_checking=False, loggers=[logger], current_epoch=3)
    module._val_rows = [["Tell me of love.", "an answer", 0.25]]
    module._log_sample_table()
    module._log_sample_table()  # wandb tables are immutable: every call logs all rows so far
    name, = {c.args[0] for c in logger.log_table.call_args_list}
    assert name == "rlhf_samples"
    assert logger.log_table.call_args.kwargs["columns"] == ["iteration", "prompt", "answer", "reward"]
    assert len(logger.log_table.call_args.kwargs["data"]) == 2


@pytest.mark.slow
def test_ppo_sharded_over_two_processes(tmp_path: Path, tiny_ckpt: Path, prompts_file: Path,
                                       rm_ckpts: dict[str, Path]) -> None:
    """FSDP2 (ModelParallelStrategy, gloo on CPU): policy, reference, value model (from a reward
    checkpoint) and both reward models sharded, the policy gathered once per rollout, two PPO
    iterations and a sharded checkpoint of the policy."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "llama2_lightning.cli", "fit", "--config", str(ROOT / "configs/rlhf/tiny-ppo-rule.yaml"),
         f"--model.init_args.init_from={tiny_ckpt}", "--trainer.devices=2",
         "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
         "--trainer.strategy.data_parallel_size=2", "--trainer.strategy.tensor_parallel_size=1",
         "--trainer.max_epochs=2", "--trainer.check_val_every_n_epoch=2", f"--trainer.default_root_dir={tmp_path}",
         "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path / 'logs'}",
         f"--data.init_args.sources=[{{path: {prompts_file}, format: prompts}}]",
         f"--data.init_args.tokenizer_path={TOKENIZER}", f"--model.init_args.max_new_tokens={NEW_TOKENS}",
         "--model.init_args.reward=llama2_lightning.reward_functions.Llama2DualReward",
         f"--model.init_args.reward.init_args.helpful_checkpoint={rm_ckpts['helpful']}",
         f"--model.init_args.reward.init_args.safety_checkpoint={rm_ckpts['safety']}",
         f"--model.init_args.value_init_from={rm_ckpts['helpful']}",
         "--trainer.enable_progress_bar=false"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    [metrics] = (tmp_path / "logs").glob("lightning_logs/version_*/metrics.csv")
    rows = [r for r in csv.DictReader(open(metrics)) if r.get("train/policy_loss")]
    assert len(rows) == 2 and all(math.isfinite(float(r["train/loss"])) for r in rows)
    assert all(0 <= float(r["train/reward_safety"]) <= 1 for r in rows)  # both reward models scored
    config, state = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")  # consolidated from the shards
    assert config == LlamaConfig.from_name("tiny") and "output.weight" in state
