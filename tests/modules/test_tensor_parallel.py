"""The stages under a 2 x 2 mesh (4 gloo processes on CPU: FSDP2 over 2 tensor-parallel pairs), the
70B layout in miniature (``configs/*/tiny-tp*.yaml``), against runs without tensor parallelism."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from paths import ROOT, TOKENIZER

from llama2_lightning import LlamaConfig, Transformer
from llama2_lightning.checkpoint import load_lightning


def _fit(config: Path, args: list[str], out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "llama2_lightning.cli", "fit", "--config", str(config), *args,
         f"--trainer.default_root_dir={out}", "--trainer.enable_progress_bar=false",
         "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={out / 'logs'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _ranks(rec: Path, n: int) -> list[dict]:
    return [json.loads((rec / f"rank{r}.json").read_text()) for r in range(n)]


def _on_one_process(batch_size: int) -> list[str]:
    return ["--trainer.devices=1", "--trainer.strategy=auto", f"--data.init_args.batch_size={batch_size}"]


@pytest.mark.slow
def test_tiny_tp_pretraining_matches_one_process(tmp_path: Path, tiny_init: Path) -> None:
    common = [f"--model.init_args.init_from={tiny_init}", "--data.init_args.max_seq_len=32",
              f"--data.init_args.cache_dir={tmp_path / 'cache'}", "--trainer.max_steps=3",
              "--trainer.limit_val_batches=0", "--model.init_args.optimizer.warmup_steps=2",
              "--trainer.callbacks+=recorder.Recorder"]
    config = ROOT / "configs/pretrain/tiny-tp.yaml"
    _fit(config, [*common, "--data.init_args.batch_size=2", f"--trainer.callbacks.out_dir={tmp_path / 'rec_tp'}"],
         tmp_path / "tp")
    ranks = _ranks(tmp_path / "rec_tp", 4)
    total = ranks[0]["total_numel"]
    for rank in ranks:
        assert rank["world_size"] == 4 and rank["sharded"]
        # 1/4 of every weight but the RMSNorms, which are replicated over TP (1/2 of them each)
        assert total / 4 < rank["local_numel"] < total / 4 * 1.01
    assert ranks[0]["losses"] == ranks[1]["losses"] and ranks[2]["losses"] == ranks[3]["losses"]  # TP pairs
    _fit(config, [*common, *_on_one_process(4), f"--trainer.callbacks.out_dir={tmp_path / 'rec_one'}"],
         tmp_path / "one")
    single = _ranks(tmp_path / "rec_one", 1)[0]["losses"]
    two_by_two = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[2]["losses"])]
    assert len(single) == len(two_by_two) == 3
    torch.testing.assert_close(torch.tensor(two_by_two), torch.tensor(single), rtol=1e-4, atol=1e-4)
    # the 2-D sharded checkpoint consolidates into the whole model
    config_, state = load_lightning(tmp_path / "tp" / "checkpoints" / "last.ckpt")
    assert config_ == LlamaConfig.from_name("tiny") and sum(t.numel() for t in state.values()) == total
    Transformer(config_).load_state_dict(state, strict=True)


def _metrics(out: Path) -> list[dict[str, str]]:
    [path] = (out / "logs").glob("lightning_logs/version_*/metrics.csv")
    return list(csv.DictReader(open(path)))


@pytest.mark.slow
def test_tiny_tp_ppo_iteration_matches_fsdp_alone(tmp_path: Path, tiny_init: Path) -> None:
    """One PPO iteration (policy, reference and value model all split 2 ways, sampled rollouts) on the
    2 x 2 mesh, against the same iteration with FSDP2 alone on 2 processes: the same data-parallel
    replicas with the same seeds, so only tensor parallelism differs."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me of {n}."}) + "\n"
                               for n in ["the king", "the queen", "the sea", "love", "war", "the night", "my lord",
                                         "thy heart"]))
    common = [f"--model.init_args.init_from={tiny_init}", "--trainer.max_epochs=1",
              "--model.init_args.max_new_tokens=8",
              f"--data.init_args.sources=[{{path: {prompts}, format: prompts}}]"]
    config = ROOT / "configs/rlhf/tiny-ppo-tp.yaml"
    _fit(config, common, tmp_path / "tp")
    _fit(config, [*common, "--trainer.devices=2", "--trainer.strategy.tensor_parallel_size=1"], tmp_path / "fsdp")
    [tp] = [r for r in _metrics(tmp_path / "tp") if r.get("train/policy_loss")]
    [fsdp] = [r for r in _metrics(tmp_path / "fsdp") if r.get("train/policy_loss")]
    for key in ("train/reward", "train/kl", "train/response_length", "train/value", "train/policy_loss",
                "train/value_loss", "train/grad_norm_policy", "train/grad_norm_value"):
        assert float(tp[key]) == pytest.approx(float(fsdp[key]), rel=1e-3, abs=1e-4), key


@pytest.mark.slow
def test_reward_model_step_on_the_2x2_mesh_matches_one_process(tmp_path: Path, tiny_init: Path) -> None:
    """Two reward-model steps (trunk split 2 ways, head replicated over TP, FSDP2 over the pairs)
    give the 1-process losses: the first checks the forward, the second the update. Every step sees
    all 10 pairs (5 per replica), so the batches are the same whatever order each run draws them in."""
    names = ["the king", "the queen", "the sea", "love", "war", "the night", "my lord", "thy heart", "the moon",
             "the field"]
    pairs, held_out = tmp_path / "pairs.jsonl", tmp_path / "held_out.jsonl"
    for path, verb in ((pairs, "Tell me of"), (held_out, "Sing of")):
        path.write_text("".join(json.dumps({"prompt": f"{verb} {n}.", "chosen": f"{n} is kind, thank you.",
                                            "rejected": f"go away, {n}."}) + "\n" for n in names))
    common = [f"--model.init_args.init_from={tiny_init}", "--model.init_args.optimizer.lr=1e-3",
              f"--data.init_args.sources=[{{path: {pairs}}}]", f"--data.init_args.tokenizer_path={TOKENIZER}",
              "--data.init_args.max_seq_len=64", "--data.init_args.val_fraction=0.0",
              f"--data.init_args.val_sources=[{{path: {held_out}}}]", "--trainer.max_steps=2", "--trainer.max_epochs=2",
              "--trainer.limit_val_batches=0", "--trainer.callbacks+=recorder.Recorder"]
    config = ROOT / "configs/reward/tiny-helpful.yaml"
    _fit(config, [*common, "--trainer.devices=4",
                  "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
                  "--trainer.strategy.data_parallel_size=2", "--trainer.strategy.tensor_parallel_size=2",
                  "--data.init_args.batch_size=5", f"--trainer.callbacks.out_dir={tmp_path / 'rec_tp'}"],
         tmp_path / "tp")
    ranks = _ranks(tmp_path / "rec_tp", 4)
    _fit(config, [*common, *_on_one_process(10), f"--trainer.callbacks.out_dir={tmp_path / 'rec_one'}"],
         tmp_path / "one")
    single = _ranks(tmp_path / "rec_one", 1)[0]["losses"]
    two_by_two = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[2]["losses"])]
    assert len(single) == 2
    torch.testing.assert_close(torch.tensor(two_by_two), torch.tensor(single), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_tensor_parallel_run_killed_after_a_sharded_checkpoint_resumes_exactly(tmp_path: Path, tiny_init: Path) -> None:
    """TP 2 on 2 processes: a crash after the step-2 checkpoint (each rank saved its own shards of
    the weights and of AdamW's state), then --ckpt_path last, gives the uninterrupted run's losses."""
    raw = yaml.safe_load((ROOT / "configs/pretrain/tiny-tp.yaml").read_text())
    [ckpt] = [c for c in raw["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    ckpt["init_args"]["every_n_train_steps"] = 2
    config = tmp_path / "tiny-tp.yaml"
    config.write_text(yaml.safe_dump(raw))
    common = [f"--model.init_args.init_from={tiny_init}", "--data.init_args.max_seq_len=32",
              f"--data.init_args.cache_dir={tmp_path / 'cache'}", "--data.init_args.batch_size=2",
              "--trainer.devices=2", "--trainer.strategy.data_parallel_size=1", "--trainer.max_steps=4",
              "--trainer.limit_val_batches=0", "--model.init_args.optimizer.warmup_steps=2",
              "--trainer.callbacks+=recorder.Recorder"]
    _fit(config, [*common, f"--trainer.callbacks.out_dir={tmp_path / 'a_rec'}"], tmp_path / "a")
    with pytest.raises(AssertionError, match="interrupted at step 2"):
        _fit(config, [*common, f"--trainer.callbacks.out_dir={tmp_path / 'b_rec1'}",
                      "--trainer.callbacks+=recorder.Interrupt", "--trainer.callbacks.at_step=2"], tmp_path / "b")
    assert (tmp_path / "b" / "checkpoints" / "last.ckpt" / "meta.pt").is_file()  # sharded: a directory
    _fit(config, [*common, f"--trainer.callbacks.out_dir={tmp_path / 'b_rec2'}", "--ckpt_path=last"], tmp_path / "b")
    for a, b in zip(_ranks(tmp_path / "a_rec", 2), _ranks(tmp_path / "b_rec2", 2)):
        assert len(a["losses"]) == 4 and b["losses"] == a["losses"][2:]


@pytest.mark.slow
def test_tiny_tp_sft_runs_and_samples_chat_answers(tmp_path: Path, tiny_init: Path) -> None:
    """Supervised fine-tuning on the 2 x 2 mesh: the answer loss on vocabulary-sharded logits, chat
    samples decoded by each pair with its KV-cache heads, a 2-D sharded checkpoint that consolidates."""
    proc = _fit(ROOT / "configs/sft/tiny-tp.yaml",
         [f"--model.init_args.init_from={tiny_init}", "--trainer.max_steps=2", "--trainer.log_every_n_steps=1",
          "--trainer.limit_val_batches=1",
          "--trainer.val_check_interval=2", "--data.init_args.max_seq_len=64", "--data.init_args.batch_size=2",
          "--trainer.callbacks.every_n_steps=2", "--trainer.callbacks.max_new_tokens=4"], tmp_path)
    rows = _metrics(tmp_path)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(losses) == 2 and all(0 < v < 10 for v in losses + val) and val
    # both chat prompts answered at step 2 and again at the end of training (rank 0 prints)
    assert proc.stdout.count("[step 2] ") == 4
    config, state = load_lightning(tmp_path / "checkpoints" / "last.ckpt")
    Transformer(config).load_state_dict(state, strict=True)
