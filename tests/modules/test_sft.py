"""SFT stage: configs instantiate, the loss sees answer tokens only, packing changes nothing, training helps."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml

from paths import ROOT, SELF_INSTRUCT, TOKENIZER

from llama2_lightning import LlamaConfig
from llama2_lightning.callbacks.chat_samples import ChatSamples
from llama2_lightning.checkpoint import load_model
from llama2_lightning.cli import lightning_cli
from llama2_lightning.data.sft import IGNORE_INDEX, SFTCollator, SFTDataModule, packed_attention_mask
from llama2_lightning.losses import answer_loss
from llama2_lightning.modules import SFTModule
from llama2_lightning.modules.args import OptimizerArgs

CONFIGS = sorted((ROOT / "configs" / "sft").glob("*.yaml"))
PAPER_COUNTS = {"llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320, "llama2-70b": 68_976_648_192}
ON_ONE_CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.strategy=auto"]


def _sft_module(init_from: Path, **kwargs: object) -> SFTModule:
    module = SFTModule(init_from=str(init_from), **kwargs)
    module.configure_model()
    return module


def _self_instruct(limit: int, **kwargs: object) -> SFTDataModule:
    dm = SFTDataModule(sources=[{"path": str(SELF_INSTRUCT), "format": "self_instruct", "limit": limit}],
                       tokenizer_path=str(TOKENIZER), **kwargs)
    dm.setup()
    return dm


# ----------------------------------------------------------------------------------------- configs


def test_configs_exist() -> None:
    assert {"tiny", "llama2-7b", "llama2-13b", "llama2-70b"} <= {p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_instantiates(path: Path, tmp_path: Path, tiny_ckpt: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    model_args = raw["model"]["init_args"]
    preset = model_args["model"]
    # The tiny config starts from the pretraining run's output, which a fresh checkout lacks; the
    # paper configs point at placeholder directories, so they are built with random weights.
    init = str(tiny_ckpt) if preset is None else "null"
    cli = lightning_cli(["--config", str(path), *ON_ONE_CPU, f"--trainer.default_root_dir={tmp_path}",
                         f"--model.init_args.init_from={init}"], run=False)
    module, opt = cli.model, cli.model.optimizer_args
    assert isinstance(module, SFTModule) and isinstance(cli.datamodule, SFTDataModule)
    assert tuple(opt.betas) == (0.9, 0.95) and opt.eps == 1e-5 and opt.weight_decay == 0.1 and opt.min_lr_ratio == 0.1
    if path.stem.startswith("smollm2"):  # the real model: from its GGUF, in its own ChatML format, fp32 on CPU
        assert model_args["init_from"] == cli.datamodule.tokenizer_path == "models/SmolLM2-135M-Instruct.Q4_1.gguf"
        assert cli.datamodule.chat_template == "model" and raw["trainer"]["precision"] == "32-true"
        assert opt.lr == 5e-5 and cli.datamodule.truncation == "drop"  # 32 steps, not 2 epochs; ChatML cannot be cut at turns
        return
    assert raw["trainer"]["max_epochs"] == 2  # paper: 2 epochs
    ckpt = [c for c in cli.trainer.callbacks if type(c).__name__ == "ModelCheckpoint"]
    assert ckpt and Path(ckpt[0].dirpath) == tmp_path / "checkpoints"
    assert any(isinstance(c, ChatSamples) for c in cli.trainer.callbacks)
    if preset is None:
        assert module.config == LlamaConfig.from_name("tiny")  # taken from init_from
        assert model_args["init_from"] == "runs/pretrain-tiny/checkpoints/last.ckpt"
        assert cli.datamodule.tokenizer_path == "data/tokenizer.model"
        return
    assert preset in PAPER_COUNTS and module.config == LlamaConfig.from_name(preset)
    with torch.device("meta"):
        module.configure_model()
    assert module.model.num_parameters() == PAPER_COUNTS[preset]
    assert opt.lr == 2e-5 and module.sharding.param_dtype == "bfloat16" and module.sharding.activation_checkpointing
    t, d = raw["trainer"], raw["data"]["init_args"]
    mesh = t["strategy"]["init_args"]
    # the ranks of a tensor-parallel group read the same rows: data-parallel replicas count
    assert mesh["data_parallel_size"] * d["batch_size"] * t["accumulate_grad_batches"] == 64  # paper: batch 64
    assert d["max_seq_len"] == 4096 and d["packing"]  # paper: 4,096 tokens, prompts and answers concatenated
    assert mesh["data_parallel_size"] * mesh["tensor_parallel_size"] == t["num_nodes"] * t["devices"]
    assert mesh["tensor_parallel_size"] == (8 if preset == "llama2-70b" else 1)


def test_tiny_config_fast_dev_run_and_checkpoint(tmp_path: Path, tiny_ckpt: Path) -> None:
    cli = lightning_cli(["fit", "--config", str(ROOT / "configs/sft/tiny.yaml"), "--trainer.fast_dev_run=2",
                         f"--model.init_args.init_from={tiny_ckpt}", f"--trainer.default_root_dir={tmp_path}",
                         "--trainer.enable_progress_bar=false",
                         "--trainer.callbacks.max_new_tokens=8"])  # the last callback listed: ChatSamples
    trainer, module = cli.trainer, cli.model
    assert trainer.global_step == 2
    for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
        assert math.isfinite(float(trainer.callback_metrics[key])), key
    [samples] = [c for c in trainer.callbacks if isinstance(c, ChatSamples)]
    assert [p for _, p, _ in samples.history] == samples.prompts  # answered once, at the end of training
    # The checkpoint carries the config, so the converters and `chat` can rebuild the fine-tuned model.
    trainer.save_checkpoint(tmp_path / "sft.ckpt")
    loaded = load_model(tmp_path / "sft.ckpt")
    assert loaded.config == module.config
    for name, tensor in module.model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)


def test_data_longer_than_the_model_context_is_refused(tmp_path: Path, tiny_ckpt: Path) -> None:
    # The start-up check (compat_checks) names the module; SFTModule.setup's own check says the same.
    with pytest.raises(ValueError, match=r"max_seq_len=512 exceeds the (SFTModule )?model's max_seq_len=256"):
        lightning_cli(["fit", "--config", str(ROOT / "configs/sft/tiny.yaml"), "--trainer.fast_dev_run=1",
                       f"--model.init_args.init_from={tiny_ckpt}", f"--trainer.default_root_dir={tmp_path}",
                       "--data.init_args.max_seq_len=512", "--trainer.enable_progress_bar=false"])


def test_missing_init_from_says_what_to_run() -> None:
    with pytest.raises(FileNotFoundError, match=r"configs/pretrain/tiny.yaml"):
        SFTModule(init_from="runs/does-not-exist/last.ckpt")


# ------------------------------------------------------------------------------ answer-only loss


def test_answer_loss_counts_answer_positions_only() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 9, 17, generator=g)
    labels = torch.randint(0, 17, (2, 9), generator=g)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[1, :2] = IGNORE_INDEX
    labels[1, 6:] = IGNORE_INDEX  # padding
    answer = labels != IGNORE_INDEX
    loss, n, correct = answer_loss(logits, labels)
    # Reference, position by position.
    nll = [-torch.log_softmax(logits[b, t], -1)[labels[b, t]] for b in range(2) for t in range(9) if answer[b, t]]
    torch.testing.assert_close(loss, torch.stack(nll).mean())
    assert n == answer.sum() and correct == ((logits.argmax(-1) == labels) & answer).sum()

    # Whatever the model predicts at prompt positions leaves the loss unchanged ...
    noisy = logits.clone()
    noisy[~answer] = 100 * torch.randn(int((~answer).sum()), 17, generator=g)
    assert all(torch.equal(a, b) for a, b in zip(answer_loss(noisy, labels), (loss, n, correct)))
    # ... while a change at one answer position, or to one answer label, moves it.
    moved = logits.clone()
    moved[0, 5] += torch.randn(17, generator=g)
    assert not torch.equal(answer_loss(moved, labels)[0], loss)
    relabelled = labels.clone()
    relabelled[0, 5] = (labels[0, 5] + 1) % 17
    assert not torch.equal(answer_loss(logits, relabelled)[0], loss)
    # A batch without answer tokens contributes zero rather than NaN.
    empty = answer_loss(logits, torch.full_like(labels, IGNORE_INDEX))
    assert empty[0].item() == 0.0 and empty[1].item() == 0


def test_prompt_tokens_get_no_gradient(tiny_ckpt: Path) -> None:
    dm = _self_instruct(6, max_seq_len=256, batch_size=4, val_fraction=0.2)
    batch = next(iter(dm.train_dataloader()))
    module = _sft_module(tiny_ckpt)
    captured: dict[str, torch.Tensor] = {}

    def keep(_: torch.nn.Module, __: object, out: torch.Tensor) -> None:
        out.retain_grad()
        captured["logits"] = out

    handle = module.model.output.register_forward_hook(keep)
    loss, n, _ = module._loss(batch)
    handle.remove()
    loss.backward()
    grad = captured["logits"].grad  # (B, T, V)
    touched = grad.abs().amax(dim=-1) > 0  # (B, T): positions whose prediction the loss depends on
    answer = batch["labels"] != IGNORE_INDEX
    assert torch.equal(touched, answer)
    assert int(n) == int(answer.sum()) and (~answer).sum() > answer.sum() / 4  # prompts are a real share
    # The tokens that untouched positions would predict are the prompt: the chat markers and the user's text.
    ids, skipped = batch["input_ids"][0], ~answer[0, :-1]
    prompt_text = dm.tokenizer.decode(ids[1:][skipped].tolist())
    assert prompt_text.startswith("[INST]") and prompt_text.endswith("[/INST]") and len(prompt_text) > 20


# ----------------------------------------------------------------------------------- packing


def _token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sorted per-answer-token NLL: comparable between batches that hold the same tokens in another order."""
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    return nll[labels.flatten() != IGNORE_INDEX].sort().values


def test_packed_and_padded_batches_give_the_same_loss(tiny_ckpt: Path) -> None:
    kwargs = dict(max_seq_len=256, batch_size=64, val_fraction=0.1, truncation="drop")
    padded, packed = _self_instruct(24, **kwargs), _self_instruct(24, packing=True, **kwargs)
    rows, samples = packed.train_dataset.samples, padded.train_dataset.samples
    assert len(rows) < len(samples) and max(int(r["segment_ids"].max()) for r in rows) > 1  # really packed
    collate = SFTCollator(padded.tokenizer.pad_id)
    padded_batch, packed_batch = collate(samples), collate(rows)
    module = _sft_module(tiny_ckpt)
    with torch.no_grad():
        loss_padded, n_padded, correct_padded = module._loss(padded_batch)
        loss_packed, n_packed, correct_packed = module._loss(packed_batch)
        per_padded = _token_nll(module(padded_batch["input_ids"]), padded_batch["labels"])
        mask = packed_attention_mask(packed_batch["segment_ids"])
        per_packed = _token_nll(module(packed_batch["input_ids"], packed_batch["position_ids"], mask),
                                packed_batch["labels"])
        # Control: the same packed rows without per-dialog positions and mask score differently.
        per_leaky = _token_nll(module(packed_batch["input_ids"]), packed_batch["labels"])
    assert n_packed == n_padded and correct_packed == correct_padded
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_packed, per_padded, rtol=1e-5, atol=1e-5)  # token by token
    assert (per_leaky - per_padded).abs().max() > 1e-2


# ----------------------------------------------------------------------------------- training


def test_training_lowers_held_out_answer_loss(tmp_path: Path, tiny_ckpt: Path) -> None:
    L.seed_everything(0)
    dm = SFTDataModule(sources=[{"path": str(SELF_INSTRUCT), "format": "self_instruct", "limit": 60}],
                       tokenizer_path=str(TOKENIZER), max_seq_len=128, batch_size=8, val_fraction=0.2, seed=1)
    module = SFTModule(init_from=str(tiny_ckpt), optimizer=OptimizerArgs(lr=5e-3, warmup_steps=2))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=15, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path)
    [before] = trainer.validate(module, dm, verbose=False)
    trainer.fit(module, dm)
    [after] = trainer.validate(module, dm, verbose=False)
    assert len(dm.split_indices["val"]) == 12 and not set(dm.split_indices["val"]) & set(dm.split_indices["train"])
    assert after["val/loss"] < before["val/loss"] - 1.0, (before, after)
    assert after["val/acc"] > before["val/acc"]


# ----------------------------------------------------------------------------------- callbacks


def test_chat_samples_answers_in_chat_format_and_keeps_history_across_resume(tiny_ckpt: Path) -> None:
    module = _sft_module(tiny_ckpt)
    dm = _self_instruct(4, max_seq_len=64)
    # What log_samples reads from the trainer; no fit needed.
    trainer = SimpleNamespace(datamodule=dm, global_step=0, is_global_zero=True, loggers=[])
    callback = ChatSamples(prompts=["Name a colour."], system="Be brief.", max_new_tokens=6, temperature=0.0,
                           print_samples=False)
    [answer] = callback.log_samples(trainer, module)
    # The same greedy answer, computed here from the Llama 2-Chat prompt text.
    text = "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nName a colour. [/INST]"
    from llama2_lightning.generation import generate

    tok = dm.tokenizer
    [row] = generate(module.model, [tok.encode(text, bos=True)], 6, temperature=0.0, eos_id=tok.eos_id).as_lists()
    assert answer == tok.decode([t for t in row if t != tok.eos_id]).strip()
    restored = ChatSamples()
    restored.load_state_dict(json.loads(json.dumps(callback.state_dict())))  # survives serialisation
    assert restored.history == callback.history == [(0, "Name a colour.", answer)]
