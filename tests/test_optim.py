from __future__ import annotations

import math

import pytest
import torch

from llama2_lightning import Transformer
from llama2_lightning.optim import build_optimizer, cosine_with_warmup, param_groups


def test_warmup_is_linear_from_zero_to_peak() -> None:
    assert cosine_with_warmup(0, 2000, 10000) == pytest.approx(1 / 2000)
    assert cosine_with_warmup(999, 2000, 10000) == pytest.approx(0.5)
    assert cosine_with_warmup(1999, 2000, 10000) == pytest.approx(1.0)


def test_cosine_decays_to_ten_percent_floor() -> None:
    # halfway through the decay the cosine term is 0.5: 0.1 + 0.9 * 0.5
    assert cosine_with_warmup(2000 + 4000, 2000, 10000) == pytest.approx(0.55)
    assert cosine_with_warmup(2000, 2000, 10000) == pytest.approx(1.0)
    assert cosine_with_warmup(10000, 2000, 10000) == pytest.approx(0.1)
    assert cosine_with_warmup(50000, 2000, 10000) == pytest.approx(0.1)  # flat after the end
    values = [cosine_with_warmup(s, 2000, 10000) for s in range(2000, 10001, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay
    assert cosine_with_warmup(3000, 2000, 10000, min_lr_ratio=0.0) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 1000 / 8000)))


def test_no_weight_decay_on_norms_and_embeddings() -> None:
    model = Transformer.from_name("tiny")
    decay, no_decay = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "tok_embeddings.weight" in no_decay_names and "norm.weight" in no_decay_names
    assert all("norm" in n or "tok_embeddings" in n for n in no_decay_names)
    assert "output.weight" in {names[id(p)] for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    everything = param_groups(model, 0.1, decay_norm_and_embeddings=True)
    assert len(everything[1]["params"]) == 0


def test_adamw_paper_defaults_applied() -> None:
    model = Transformer.from_name("tiny")
    opt = build_optimizer(param_groups(model, 0.1), "adamw", 3e-4, (0.9, 0.95), 1e-5)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-5
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        build_optimizer(param_groups(model, 0.1), "sgd", 1e-3, (0.9, 0.95), 1e-5)  # type: ignore[arg-type]


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def test_8bit_adamw_steps_and_quarters_the_state_of_large_matrices() -> None:
    pytest.importorskip("bitsandbytes")
    states = {}
    for name in ("adamw", "adamw8bit"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(512, 512, bias=False), torch.nn.Linear(512, 512, bias=False))
        before = [p.detach().clone() for p in model.parameters()]
        opt = build_optimizer(param_groups(model, 0.1), name, 1e-3, (0.9, 0.95), 1e-5)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        states[name] = optimizer_state_bytes(opt)
    moments = 2 * 2 * 512 * 512 * 4  # two fp32 moments per weight; the rest is the step counters
    assert moments <= states["adamw"] < moments + 64
    assert states["adamw"] / states["adamw8bit"] >= 3.5


def test_rlhf_module_takes_the_8bit_optimizer(tmp_path) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    from llama2_lightning.callbacks.ppo import PPOCallback
    from llama2_lightning.modules.args import OptimizerArgs
    from llama2_lightning.modules.rlhf import RLHFModule
    from llama2_lightning.reward_functions import LengthRuleReward

    module = RLHFModule(model="tiny", reward=LengthRuleReward(target_length=8),
                        optimizer=OptimizerArgs(name="adamw8bit", lr=1e-5), value_lr=1e-4)
    module.experience_callback = PPOCallback()  # PPO: a value model with its own LR
    module.configure_model()
    opt = module.configure_optimizers()["optimizer"]
    assert isinstance(opt, bnb.optim.AdamW8bit)
    assert {g["lr"] for g in opt.param_groups} == {1e-5, 1e-4}  # policy and value model keep their own LRs
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(module.model.parameters())) + len(
        list(module.value_model.parameters()))
    default = RLHFModule(model="tiny", reward=LengthRuleReward(target_length=8))
    default.configure_model()
    assert type(default.configure_optimizers()["optimizer"]) is torch.optim.AdamW
