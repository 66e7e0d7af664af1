"""The ``finetune`` group: LoRA through peft on our own Transformer, or the top N blocks only, in SFT, reward
models and RLHF; checkpoints in Meta's layout (merged) that a resumed run turns back into adapters exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from paths import ROOT, TOKENIZER

from llama2_lightning import LlamaConfig, Transformer
from llama2_lightning.callbacks.ppo import PPOCallback
from llama2_lightning.checkpoint import load_checkpoint, load_model
from llama2_lightning.cli import lightning_cli
from llama2_lightning.data.prompts import PromptDataModule
from llama2_lightning.modules import RewardModule, RLHFModule, SFTModule
from llama2_lightning.modules.args import FinetuneArgs, OptimizerArgs
from llama2_lightning.modules.finetune import adapted_layers, apply_finetune, trainable_parameters
from llama2_lightning.reward_functions import TokenRuleReward
from llama2_lightning.reward_models import load_reward_model

LORA = FinetuneArgs(lora_rank=4, lora_alpha=8)
FAST = OptimizerArgs(lr=1e-2, warmup_steps=0, min_lr_ratio=1.0, decay_steps=1)  # constant
ON_ONE_CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.strategy=auto"]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    threads = torch.get_num_threads()  # tiny matmuls: a second thread only adds synchronisation
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Rows(Dataset):
    """``n`` fixed batches of 2 random rows, every token a label (or a preference pair for a reward model)."""

    def __init__(self, n: int, reward: bool = False) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.reward = torch.randint(3, 2048, (n, 2, 16), generator=g), reward  # (n, 2, T)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.reward:  # 1 pair: the chosen row, then the rejected one
            return {"input_ids": self.x[i], "attention_mask": torch.ones_like(self.x[i], dtype=torch.bool),
                    "margin_label": [None]}
        return {"input_ids": self.x[i], "labels": self.x[i]}


def loader(n: int, reward: bool = False) -> DataLoader:
    return DataLoader(Rows(n, reward), batch_size=None)


def trainer(root: Path, **kwargs: Any) -> L.Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root, **kwargs)


def sft(tiny_ckpt: Path, finetune: FinetuneArgs = LORA, **kwargs: Any) -> SFTModule:
    module = SFTModule(init_from=str(tiny_ckpt), finetune=finetune, optimizer=FAST, **kwargs)
    module.configure_model()
    return module


def tokens(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 2048, (n, 12), generator=torch.Generator().manual_seed(seed))  # (n, T)


def lora_names(module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad and ".lora_" in n}


# ------------------------------------------------------------------------------------------------- LoRA


def test_lora_starts_as_the_base_model_and_moves_after_a_step(tiny_ckpt: Path, tmp_path: Path) -> None:
    base = load_model(tiny_ckpt).eval()
    module = sft(tiny_ckpt)
    model = module.model.eval()
    x = tokens()
    assert torch.equal(model(x), base(x))  # B = 0: the adapters add exactly nothing yet
    # adapters on every block's seven maps, nothing else trains
    assert len(adapted_layers(model)) == 7 * 2
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == lora_names(model) and len(trained) == 2 * 7 * 2
    optimised = {id(p) for g in module.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    assert optimised == {id(p) for p in model.parameters() if p.requires_grad}  # frozen weights are not in AdamW
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    trainer(tmp_path, max_steps=1).fit(module, loader(1))
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads <= trained
    model.eval()
    assert not torch.allclose(model(x), base(x))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())  # the base never moves


def test_adapted_forward_is_w_plus_alpha_over_r_ba_and_the_merged_checkpoint_loads_strictly(
        tiny_ckpt: Path, tmp_path: Path) -> None:
    module = sft(tiny_ckpt, FinetuneArgs(lora_rank=3, lora_alpha=6, lora_targets=["wq", "wv", "w2"]))
    model = module.model.eval()
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.3)  # B != 0: a real update to check
    # the independent computation: a plain Transformer whose weights are W + (alpha / r) B A, by hand
    manual = load_model(tiny_ckpt).eval()
    own = dict(model.named_parameters())
    for name, p in manual.named_parameters():
        stem = name.removesuffix(".weight")
        if f"{stem}.lora_A.default.weight" in own:
            a, b = own[f"{stem}.lora_A.default.weight"], own[f"{stem}.lora_B.default.weight"]  # (r, in), (out, r)
            with torch.no_grad():
                p.add_((6 / 3) * b @ a)
    assert {n.split(".")[-1] for n in adapted_layers(model)} == {"wq", "wv", "w2"}
    x = tokens()
    torch.testing.assert_close(model(x), manual(x), atol=1e-5, rtol=1e-5)
    # the checkpoint is a plain model: Meta names only, strict load, the adapted model's logits
    checkpoint = {"state_dict": module.state_dict()}  # what Lightning hands on_save_checkpoint
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "lora.ckpt")
    _, state = load_checkpoint(tmp_path / "lora.ckpt")
    assert set(state) == set(Transformer.from_name("tiny").state_dict())
    plain = load_model(tmp_path / "lora.ckpt").eval()
    torch.testing.assert_close(plain(x), model.eval()(x), atol=1e-5, rtol=1e-5)


def test_resumed_lora_run_restores_adapters_frozen_weights_and_optimizer_exactly(tiny_ckpt: Path,
                                                                                   tmp_path: Path) -> None:
    def run(root: Path, epochs: int, ckpt_path: Path | None = None) -> SFTModule:
        L.seed_everything(0)
        module = SFTModule(init_from=str(tiny_ckpt), finetune=LORA, optimizer=OptimizerArgs(lr=1e-2, warmup_steps=3, decay_steps=6))
        t = trainer(root, max_epochs=epochs, enable_checkpointing=True)
        t.fit(module, loader(2), ckpt_path=ckpt_path)
        return module

    full = run(tmp_path / "a", 3)
    run(tmp_path / "b", 1)
    [ckpt] = (tmp_path / "b" / "checkpoints").glob("*.ckpt")
    resumed = run(tmp_path / "c", 3, ckpt)
    assert resumed.trainer.global_step == full.trainer.global_step == 6
    a, c = full.model.state_dict(), resumed.model.state_dict()
    assert set(a) == set(c) and all(torch.equal(a[k], c[k]) for k in a), "adapters and base bit for bit"
    sa, sc = full.trainer.optimizers[0].state_dict(), resumed.trainer.optimizers[0].state_dict()
    assert all(torch.equal(sa["state"][i]["exp_avg_sq"], sc["state"][i]["exp_avg_sq"]) for i in sa["state"])


def test_resuming_with_other_finetune_settings_is_refused(tiny_ckpt: Path, tmp_path: Path) -> None:
    module = sft(tiny_ckpt)
    trainer(tmp_path, max_steps=1, enable_checkpointing=True).fit(module, loader(1))
    [ckpt] = (tmp_path / "checkpoints").glob("*.ckpt")
    other = SFTModule(init_from=str(tiny_ckpt), finetune=FinetuneArgs(lora_rank=4, lora_targets=["wq"]))
    with pytest.raises(ValueError, match="do not match this module's"):
        trainer(tmp_path, max_steps=2).fit(other, loader(1), ckpt_path=ckpt)
    plain = SFTModule(init_from=str(tiny_ckpt))  # full fine-tuning cannot take LoRA's optimiser state
    with pytest.raises(ValueError, match="module has none|do not match"):
        trainer(tmp_path, max_steps=2).fit(plain, loader(1), ckpt_path=ckpt)


# ------------------------------------------------------------------------------------------ top N blocks


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_trainable_blocks_trains_the_top_blocks_final_norm_and_an_untied_head(tied: bool) -> None:
    torch.manual_seed(0)
    model = Transformer(LlamaConfig.from_name("tiny", n_layers=3, tie_word_embeddings=tied))
    apply_finetune(model, FinetuneArgs(trainable_blocks=2))
    trained = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("layers.") else "")
               for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"layers.1", "layers.2", "norm"} | (set() if tied else {"output"})  # tied: the embeddings
    model(tokens()).logsumexp(-1).mean().backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    assert model.layers[0].attention.wq.weight.grad is None and model.tok_embeddings.weight.grad is None


def test_lora_with_trainable_blocks_adapts_only_the_top_blocks() -> None:
    model = Transformer(LlamaConfig.from_name("tiny", n_layers=3))
    apply_finetune(model, FinetuneArgs(lora_rank=2, trainable_blocks=1))
    assert {n.split(".")[1] for n in adapted_layers(model)} == {"2"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora_names(model)


@pytest.mark.parametrize("finetune", [LORA, FinetuneArgs(trainable_blocks=1)], ids=["lora", "top-1"])
def test_sft_config_fast_dev_run_with_the_finetune_key(finetune: FinetuneArgs, tmp_path: Path, tiny_ckpt: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the tiny config's data paths
    keys = [f"--model.init_args.finetune.{k}={json.dumps(v)}" for k, v in vars(finetune).items() if v is not None]
    cli = lightning_cli(["fit", "--config", str(ROOT / "configs/sft/tiny.yaml"), *ON_ONE_CPU, *keys,
                         "--trainer.fast_dev_run=1", f"--model.init_args.init_from={tiny_ckpt}",
                         f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
                         "--trainer.callbacks.max_new_tokens=4"])
    module = cli.model
    assert module.finetune == finetune and module.hparams.finetune == vars(finetune)
    assert trainable_parameters(module.model) < module.model.num_parameters()
    assert not module.model.tok_embeddings.weight.requires_grad
    cli.trainer.save_checkpoint(tmp_path / "sft.ckpt")
    plain, x = load_model(tmp_path / "sft.ckpt").eval(), tokens()
    torch.testing.assert_close(plain(x), module.model.eval()(x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ reward model, RLHF


def test_reward_model_with_lora_trains_adapters_and_head_and_its_checkpoint_scores_the_same(
        tiny_init: Path, tmp_path: Path) -> None:
    module = RewardModule(init_from=str(tiny_init), finetune=LORA, optimizer=FAST)
    module.configure_model()
    trained = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trained == lora_names(module.model) | {"head.score.weight"}
    t = trainer(tmp_path, max_steps=2)
    t.fit(module, loader(2, reward=True))
    assert {n for n, p in module.model.named_parameters() if p.grad is not None} <= trained
    t.save_checkpoint(tmp_path / "rm.ckpt")
    x = tokens(4)
    expected = module.eval()(x)
    # the scoring path reads Meta names strictly: merged weights
    torch.testing.assert_close(load_reward_model(tmp_path / "rm.ckpt")[0](x), expected, atol=1e-5, rtol=1e-5)
    # `validate --ckpt_path` rebuilds the module from the checkpoint alone (no init_from): its adapters come back
    hparams = torch.load(tmp_path / "rm.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["init_from"] is None
    torch.manual_seed(123)  # another random base: the frozen weights must come from the checkpoint
    again = RewardModule(**hparams)
    trainer(tmp_path).validate(again, loader(1, reward=True), ckpt_path=tmp_path / "rm.ckpt", verbose=False)
    torch.testing.assert_close(again.eval()(x), expected, atol=0, rtol=0)


def test_ppo_with_lora_adapts_policy_and_value_model_and_keeps_pi0_unadapted(tiny_ckpt: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me of the {w}."}) + "\n"
                               for w in ["king", "queen", "sea", "night", "war", "love", "lord", "heart"]))
    dm = PromptDataModule(sources=[{"path": str(prompts), "format": "prompts"}], tokenizer_path=str(TOKENIZER),
                          max_prompt_len=32, batch_size=4, val_fraction=0.25, seed=0)
    L.seed_everything(0)
    module = RLHFModule(init_from=str(tiny_ckpt), reward=TokenRuleReward(target_ids=list(range(300, 556))),
                        max_new_tokens=6, minibatch_size=2, optimizer=OptimizerArgs(lr=1e-2),
                        finetune=LORA, value_finetune=FinetuneArgs(lora_rank=2, trainable_blocks=1))
    t = trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[PPOCallback(seed=0)])
    t.fit(module, dm)
    assert lora_names(module.model) and lora_names(module.value_model)
    assert {n.split(".")[2] for n in adapted_layers(module.value_model)} == {"1"}  # trunk.layers.1 only
    assert not adapted_layers(module.ref_model) and not any(p.requires_grad for p in module.ref_model.parameters())
    assert {n for n, p in module.value_model.named_parameters() if p.requires_grad} == \
        lora_names(module.value_model) | {"head.score.weight"}
    init = load_model(tiny_ckpt).state_dict()
    assert all(torch.equal(v, init[k]) for k, v in module.ref_model.state_dict().items())  # pi_0: the SFT weights
    x = tokens()
    assert not torch.allclose(module.model.eval()(x), module.ref_model(x))  # the policy moved
    t.save_checkpoint(tmp_path / "rlhf.ckpt")
    config, state = load_checkpoint(tmp_path / "rlhf.ckpt")  # the next round's init_from: the merged policy
    plain = Transformer(config)
    plain.load_state_dict(state)
    torch.testing.assert_close(plain.eval()(x), module.model(x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize("kwargs, message", [
    ({"lora_rank": 0}, r"finetune.lora_rank must be a positive integer"),
    ({"lora_rank": 4, "lora_targets": ["wq", "q_proj"]}, r"finetune.lora_targets: unknown \['q_proj'\]; allowed"),
    ({"lora_rank": 4, "trainable_blocks": 0}, r"finetune.trainable_blocks must be >= 1"),
    ({"lora_dropout": 1.0}, r"finetune.lora_dropout must be in"),
])
def test_bad_finetune_values_are_refused_by_key(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FinetuneArgs(**kwargs)


def test_more_trainable_blocks_than_layers_and_lora_on_a_sharded_model_are_refused(tiny_ckpt: Path) -> None:
    with pytest.raises(ValueError, match=r"finetune.trainable_blocks=3 exceeds the model's n_layers=2"):
        SFTModule(model="tiny", finetune={"trainable_blocks": 3})
    with pytest.raises(ValueError, match=r"value_finetune.trainable_blocks=5 exceeds"):
        RLHFModule(model="tiny", reward=TokenRuleReward(target_ids=[1]), value_finetune={"trainable_blocks": 5})
    with pytest.raises(ValueError, match=r"finetune.lora_rank=4: LoRA is not supported on a sharded model"):
        apply_finetune(Transformer.from_name("tiny"), LORA, device_mesh=object())
