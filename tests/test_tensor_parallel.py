"""Tensor parallelism (torch DTensor through ``llama2_lightning.tensor_parallel``) against the unsharded
model: real gloo processes on CPU for the numbers, torch's fake process group for the 70B layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from paths import ROOT, TOKENIZER

from llama2_lightning.config import LlamaConfig
from llama2_lightning.generation import generate
from llama2_lightning.model import Transformer
from llama2_lightning.scalar_model import ScalarModel
from llama2_lightning.tensor_parallel import (
    check_tensor_parallel,
    data_parallel_rank,
    data_parallel_size,
    is_tensor_parallel,
    parallelize_transformer,
)


def _launch(work_dir: Path, nproc: int, tp: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc-per-node={nproc}",
         str(ROOT / "tests" / "tp_worker.py"), str(work_dir), f"--tp={tp}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(work_dir / f"rank{r}.pt", weights_only=True) for r in range(nproc)]


def _case(tmp_path: Path) -> dict:
    torch.manual_seed(0)
    config = LlamaConfig.from_name("tiny")  # GQA: 4 query heads over 2 KV heads
    model = Transformer(config)
    scalar = ScalarModel.from_transformer(Transformer(config), drop_lm_head=True)
    tokens = torch.randint(0, config.vocab_size, (4, 16))
    targets = torch.randint(0, config.vocab_size, (4, 16))
    targets[0, :5] = -100  # prompt positions that carry no loss
    attention_mask = torch.ones(4, 16, dtype=torch.bool)
    attention_mask[1, :6] = False  # one left-padded row
    case = {"config": config.to_dict(), "state_dict": model.state_dict(), "scalar_state_dict": scalar.state_dict(),
            "tokens": tokens, "targets": targets, "attention_mask": attention_mask,
            "prompts": [[1, 5, 7], [3, 4, 9, 10, 11]]}
    torch.save(case, tmp_path / "case.pt")
    return {**case, "model": model, "scalar": scalar}


@pytest.mark.slow
def test_tp2_matches_the_unsharded_model(tmp_path: Path) -> None:
    case = _case(tmp_path)
    ranks = _launch(tmp_path, nproc=2, tp=2)
    model, x, y = case["model"], case["tokens"], case["targets"]
    logits = model(x)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.step()
    optimizer.zero_grad()
    loss1 = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
    total = model.num_parameters()
    for r in ranks:
        torch.testing.assert_close(r["logits"], logits.detach(), rtol=0, atol=1e-5)
        torch.testing.assert_close(r["loss0"], loss.detach(), rtol=0, atol=1e-5)
        # argmax and summed NLL straight from the vocabulary shards
        assert torch.equal(r["argmax"], logits.argmax(-1))
        nll_sum = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
        torch.testing.assert_close(r["nll_sum"], nll_sum.detach(), rtol=1e-6, atol=1e-4)
        assert r.keys() >= {"grads"} and r["grads"].keys() == grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(r["loss1"], loss1.detach(), rtol=0, atol=1e-5)
        # every weight but the replicated RMSNorms is split in two
        norms = sum(p.numel() for n, p in model.named_parameters() if n.endswith("norm.weight"))
        assert r["local_numel"] == (total - norms) // 2 + norms
        assert r["cache_shape"] == (1, 1, 8, 16)  # one of the 2 KV heads per rank
    # the KV-cache decode of the sharded policy is the unsharded one's, token for token
    greedy = generate(model, case["prompts"], 8, temperature=0.0).tokens
    sampled = generate(model, case["prompts"], 8, temperature=1.0, seed=0).tokens
    for r in ranks:
        assert torch.equal(r["greedy"], greedy)
        # ranks drew with seeds 0 and 1 and still agree: rank 0's draw is the group's
        assert torch.equal(r["sampled"], sampled)
    with torch.no_grad():
        scores = case["scalar"](x, case["attention_mask"])
    for r in ranks:
        torch.testing.assert_close(r["scores"], scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "tp", "key"),
    [({"n_heads": 4, "n_kv_heads": 2}, 4, "n_kv_heads=2"),
     ({"n_heads": 6, "n_kv_heads": 6, "dim": 96}, 4, "n_heads=6"),
     ({"vocab_size": 2047}, 2, "vocab_size=2047"),
     ({"tie_word_embeddings": True}, 2, "tie_word_embeddings")],
)
def test_sizes_that_do_not_split_are_config_errors(overrides: dict, tp: int, key: str) -> None:
    config = LlamaConfig.from_name("tiny", **overrides)
    with pytest.raises(ValueError, match=rf"tensor_parallel_size={tp} (must divide model |with model ){key}"):
        check_tensor_parallel(config, tp)
    check_tensor_parallel(config, 1)  # no TP, nothing to split


def test_70b_layout_on_64_simulated_ranks() -> None:
    """TP 8 x FSDP 8 of Llama 2 70B (two of its 80 blocks), on meta tensors and torch's fake process
    group: each rank holds 8 query heads and 1 KV head of every block, 1/64 of every weight but the
    RMSNorms (replicated over TP, 1/8 each)."""
    code = (
        "import torch, torch.distributed as dist\n"
        "from torch.testing._internal.distributed.fake_pg import FakeStore\n"
        "from torch.distributed.device_mesh import init_device_mesh\n"
        "from llama2_lightning.model import Transformer\n"
        "from llama2_lightning.tensor_parallel import parallelize_transformer\n"
        "from llama2_lightning.distributed import shard_transformer, local_numel\n"
        "dist.init_process_group('fake', store=FakeStore(), rank=5, world_size=64)\n"
        "mesh = init_device_mesh('cpu', (8, 8), mesh_dim_names=('data_parallel', 'tensor_parallel'))\n"
        "with torch.device('meta'):\n"
        "    m = Transformer.from_name('llama2-70b', n_layers=2)\n"
        "parallelize_transformer(m, mesh)\n"
        "shard_transformer(m, mesh)\n"
        "a = m.layers[0].attention\n"
        "norms = sum(p.numel() for n, p in m.named_parameters() if n.endswith('norm.weight'))\n"
        "print(tuple(a.wq.weight.shape), tuple(a.wq.weight.to_local().shape), a.n_heads, a.n_kv_heads,"
        " local_numel(m) == (m.num_parameters() - norms) // 64 + norms // 8)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split("\n")[-2] == "(8192, 8192) (128, 8192) 8 1 True"


def test_data_parallel_rank_is_the_replica_not_the_process() -> None:
    # ModelParallelStrategy's sampler arguments name the data-parallel replica: with TP 2 over 4
    # processes, process 3 is replica 1 of 2 (its TP peer, process 2, draws the same samples)
    tp = SimpleNamespace(strategy=SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": 1}),
                         global_rank=3, world_size=4)
    assert (data_parallel_rank(tp), data_parallel_size(tp)) == (1, 2)
    single = SimpleNamespace(strategy=SimpleNamespace(), global_rank=0, world_size=1)  # no sampler arguments
    assert (data_parallel_rank(single), data_parallel_size(single)) == (0, 1)


def test_without_a_tensor_parallel_mesh_nothing_changes() -> None:
    model = Transformer.from_name("tiny")
    before = {n: p for n, p in model.named_parameters()}
    assert parallelize_transformer(model, None) is model and not is_tensor_parallel(model)
    assert all(p is before[n] for n, p in model.named_parameters())
    assert model.layers[0].attention.n_kv_heads == 2


@pytest.mark.slow
def test_heldout_answers_and_samples_under_tp2_are_the_unsharded_greedy_ones(tmp_path: Path) -> None:
    """Every decoding path besides the PPO rollouts on a policy split 2 ways (2 gloo processes):
    ``RLHFModule.validation_step`` (``Trainer.validate``, ``ModelParallelStrategy``), the pipeline
    report's ``answer_heldout``, ``ChatSamples`` and ``GenerationSamples``. Greedy, each gives the
    unsharded model's tokens, and each decoding forward computes with half of ``wq`` (the TP shard)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tp_heldout_worker import CHAT_PROMPTS, NEW_TOKENS, TEXT_PROMPTS, prompt_data

    from llama2_lightning.callbacks.chat_samples import ChatSamples
    from llama2_lightning.callbacks.samples import GenerationSamples
    from llama2_lightning.pipeline.report import answer_heldout
    from llama2_lightning.reward_functions import TokenRuleReward

    torch.manual_seed(0)
    model = Transformer.from_name("tiny")
    with torch.no_grad():  # sharper attention than at init: the answers then depend on the whole prompt
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.mul_(3)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "llama_config": model.config.to_dict()}, tmp_path / "policy.ckpt")
    nouns = ["the king", "the queen", "my lord", "the sea", "love", "war", "the night", "thy heart"]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Tell me of {n}."}) + "\n" for n in nouns))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=2",
         str(ROOT / "tests" / "tp_heldout_worker.py"), str(tmp_path), str(TOKENIZER)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    data = prompt_data(tmp_path, str(TOKENIZER))
    data.setup("fit")
    tok = data.tokenizer
    model.eval()
    for r in ranks:
        assert r["tp_rank"] == r["rank"] and r["validation"]
        assert r["wq_widths"] == [model.config.dim // 2]  # 2 of the 4 query heads in every forward
        greedy = []
        for batch in r["validation"]:
            expected = generate(model, batch["prompt_ids"], NEW_TOKENS, temperature=0.0, eos_id=tok.eos_id,
                                pad_id=tok.pad_id).as_lists()
            assert batch["answer_ids"] == expected
            greedy += [tok.decode([t for t in a if t != tok.eos_id]).strip() for a in expected]
        assert len(greedy) == len(data.val_dataset) and r["report"] == greedy  # the same held-out prompts
    report = [a.answer for a in answer_heldout(tmp_path / "policy.ckpt", data, TokenRuleReward(targets=["the"]),
                                               NEW_TOKENS, temperature=0.0)]
    trainer = SimpleNamespace(datamodule=data, global_step=0, is_global_zero=True, loggers=[])
    chat = ChatSamples(CHAT_PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0.0,
                       print_samples=False).log_samples(trainer, SimpleNamespace(model=model))
    text = GenerationSamples(TEXT_PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0.0,
                             print_samples=False).log_samples(trainer, SimpleNamespace(model=model))
    assert len(set(report)) > 1 and len(set(chat)) == 2 and len(set(text)) == 2  # prompt-dependent answers
    for r in ranks:
        assert (r["report"], r["chat"], r["generation"]) == (report, chat, text)


@pytest.mark.slow
def test_meta_shards_load_into_their_tensor_parallel_ranks(tmp_path: Path) -> None:
    """A tiny model saved as Meta's 2 model-parallel shards, built split 2 ways (2 gloo processes):
    the unsharded model's logits, and TP rank i read every weight Meta split as the plan does from
    consolidated.0i.pth alone (and the replicated norms too); only the embedding, split by Meta on
    the embedding dim and by the plan on the vocabulary, is read from both."""
    from llama2_lightning.checkpoint import save_meta

    torch.manual_seed(0)
    model = Transformer.from_name("tiny")
    save_meta(model.config, model.state_dict(), tmp_path / "meta", num_shards=2)
    tokens = torch.randint(0, model.config.vocab_size, (2, 12))
    torch.save(tokens, tmp_path / "tokens.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=2",
         str(ROOT / "tests" / "tp_meta_worker.py"), str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with torch.no_grad():
        expected = model(tokens)
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"logits{rank}.pt", weights_only=True), expected,
                                   rtol=0, atol=1e-5)
        reads = json.loads((tmp_path / f"reads{rank}.json").read_text())
        assert set(reads) == set(model.state_dict())
        for name, shards in reads.items():
            assert shards == ([0, 1] if name == "tok_embeddings.weight" else [rank]), name


def test_a_meta_weight_reads_any_block_from_the_shards_that_hold_it(tmp_path: Path) -> None:
    """FSDP2's slices of a TP shard, or blocks across shards (TP size unlike the shard count): each
    the block of the merged tensor, and a block inside one shard opens that shard's file only."""
    from llama2_lightning.checkpoint import load_meta, read_config, save_meta
    from llama2_lightning.checkpoint.meta_shards import MetaShards, MetaWeight, meta_weights

    torch.manual_seed(0)
    model = Transformer.from_name("tiny", n_kv_heads=4)  # 4 KV heads: 4 shards
    save_meta(model.config, model.state_dict(), tmp_path, num_shards=4)
    assert read_config(tmp_path) == load_meta(tmp_path)[0] == model.config
    shards = MetaShards(tmp_path)
    weights = meta_weights(shards, preferred=2)
    assert sorted(shards._loaded) == [2]
    for name, full in model.state_dict().items():
        assert weights[name].shape == full.shape
        for start in range(0, full.shape[0], 7):  # rows 7 at a time, across shard boundaries too
            block = (slice(start, start + 9),) + ((slice(5, 21),) if full.dim() > 1 else ())
            torch.testing.assert_close(weights[name][block], full[block], rtol=0, atol=0, msg=name)
    alone = MetaShards(tmp_path)
    wq = MetaWeight(alone, "layers.0.attention.wq.weight", preferred=1)
    assert torch.equal(wq[(slice(16, 24),)], model.state_dict()["layers.0.attention.wq.weight"][16:24])
    assert sorted(alone._loaded) == [1]  # rows 16..23 of 64 lie in shard 1 of 4
