"""Reward-model stage: configs, the ranking loss and its margins, one forward per pair batch, the
metrics, checkpoint layout, scoring commands, Hugging Face export parity, and a learnability check."""

from __future__ import annotations

import gzip
import json
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml

from paths import ROOT, TOKENIZER

from llama2_lightning import LlamaConfig, Tokenizer
from llama2_lightning.cli import lightning_cli, main
from llama2_lightning.data.preference import PreferenceDataModule, collate_preference_pairs
from llama2_lightning.modules import RewardModule
from llama2_lightning.modules.args import OptimizerArgs
from llama2_lightning.modules.reward import HEAD_KEY, TRUNK_PREFIX, RankingMetrics
from llama2_lightning.reward_models import load_reward_model, score
from llama2_lightning.rlhf.ranking import ranking_loss
from llama2_lightning.scalar_model import DroppedLMHead

CONFIGS = sorted((ROOT / "configs" / "reward").glob("*.yaml"))
PAPER_COUNTS = {"llama2-7b": 6_738_415_616, "llama2-70b": 68_976_648_192}
ON_ONE_CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.strategy=auto"]


def quiet(tmp_path: Path) -> list[str]:
    """CSV logging into tmp instead of wandb (LearningRateMonitor needs a logger), no progress bar."""
    return ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path / 'logs'}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]

WORDS = ["apple", "river", "stone", "cloud", "green", "music", "table", "light", "storm", "paper", "horse",
         "glass", "bread", "night", "queen", "sword"]
LABELS = ["significantly_better", "better", "slightly_better", "negligibly_better", None]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """These models are tiny: one thread is faster than two, and does not stall waiting for a
    second thread when the two shared cores are busy (each op's parallel region would)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- data
def write_jsonl(path: Path, records: list[dict], gz: bool = False) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def made_up_pairs(n: int, seed: int) -> list[dict]:
    """Pairs whose chosen answer says "thank you" and rejected one "go away", around random words,
    with random ratings: a pattern a reward model can learn, and margins to exercise."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = f"Tell me about the {rng.choice(WORDS)} and the {rng.choice(WORDS)}."
        sides = []
        for marker in ("thank you", "go away"):
            words = rng.sample(WORDS, 4)
            words.insert(rng.randrange(5), marker)
            sides.append(" ".join(words))
        pairs.append({"prompt": prompt, "chosen": sides[0], "rejected": sides[1], "margin_label": rng.choice(LABELS)})
    return pairs


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pairs")
    return {"train": write_jsonl(d / "train_pairs.jsonl", made_up_pairs(60, seed=1)),
            "eval": write_jsonl(d / "eval_pairs.jsonl", made_up_pairs(24, seed=2))}


@pytest.fixture(scope="module")
def rm_ckpt(tmp_path_factory: pytest.TempPathFactory, tiny_init: Path, pair_files: dict[str, Path]) -> Path:
    """A RewardModule checkpoint as `llama2-lightning fit --config configs/reward/tiny-helpful.yaml`
    writes it: one epoch (8 steps) on the made-up pairs from the random tiny model."""
    tmp = tmp_path_factory.mktemp("rm")
    lightning_cli(["fit", "--config", str(ROOT / "configs" / "reward" / "tiny-helpful.yaml"),
                   f"--model.init_args.init_from={tiny_init}", "--model.init_args.optimizer.lr=1e-3",
                   f"--data.init_args.sources={json.dumps([{'path': str(pair_files['train'])}])}",
                   f"--data.init_args.tokenizer_path={TOKENIZER}", "--data.init_args.max_seq_len=64",
                   f"--trainer.default_root_dir={tmp}", *quiet(tmp)])
    return tmp / "checkpoints" / "last.ckpt"


def tiny_module(margin: str = "small") -> RewardModule:
    torch.manual_seed(0)
    module = RewardModule(model="tiny", margin=margin)
    module.configure_model()
    return module


# ---------------------------------------------------------------------------------------------- configs
def test_configs_exist() -> None:
    assert {"tiny-helpful", "tiny-safety", "llama2-7b-helpful", "llama2-7b-safety", "llama2-70b-safety"} <= {p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_instantiates(path: Path, tmp_path: Path, tiny_init: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    args = raw["model"]["init_args"]
    big = args.get("model") in PAPER_COUNTS
    # Big configs name their architecture; their placeholder init_from is not read here.
    init = "--model.init_args.init_from=null" if big else f"--model.init_args.init_from={tiny_init}"
    # the tiny init has 2 blocks: a config that trains the top N > 2 trains the top 1 here
    top = (args.get("finetune") or {}).get("trainable_blocks")
    blocks = [f"--model.init_args.finetune.trainable_blocks={min(top, 1)}"] if top and not big else []
    cli = lightning_cli(["--config", str(path), *ON_ONE_CPU, f"--trainer.default_root_dir={tmp_path}", init,
                         *blocks], run=False)
    module, hp, opt = cli.model, cli.model.hparams, cli.model.optimizer_args
    assert isinstance(module, RewardModule)
    # paper, section 3.2.2
    assert hp.margin == "small" and tuple(opt.betas) == (0.9, 0.95) and opt.eps == 1e-5 and opt.weight_decay == 0.1
    assert opt.min_lr_ratio == 0.1 and opt.warmup_ratio == 0.03 and opt.warmup_steps == 5
    assert raw["trainer"]["max_epochs"] == 1
    ckpt = [c for c in cli.trainer.callbacks if type(c).__name__ == "ModelCheckpoint"]
    assert ckpt and Path(ckpt[0].dirpath) == tmp_path / "checkpoints"
    sources = raw["data"]["init_args"]["sources"]
    if big:
        with torch.device("meta"):
            module.configure_model()
        config = module.config
        # the LM head (vocab x dim) is dropped, the scalar head (1 x dim) added
        expected = PAPER_COUNTS[args["model"]] - config.vocab_size * config.dim + config.dim
        assert module.model.num_parameters() == expected
        assert opt.lr == (5e-6 if args["model"] == "llama2-70b" else 1e-5)
        t, d = raw["trainer"], raw["data"]["init_args"]
        mesh = t["strategy"]["init_args"]
        # the ranks of a tensor-parallel group read the same pairs: data-parallel replicas count
        assert mesh["data_parallel_size"] * d["batch_size"] * t["accumulate_grad_batches"] == 512  # pairs
        assert mesh["data_parallel_size"] * mesh["tensor_parallel_size"] == t["num_nodes"] * t["devices"]
        assert mesh["tensor_parallel_size"] == (8 if args["model"] == "llama2-70b" else 1)
        assert d["max_seq_len"] == 4096 and module.sharding.param_dtype == "bfloat16"
        assert t["strategy"]["class_path"].endswith("ModelParallelStrategy")
    elif path.stem.startswith("smollm2"):
        assert args["init_from"] == "runs/sft-smollm2-135m/checkpoints/last.ckpt"  # the SFT config's output
        # the top 4 blocks and the head for 144 steps, at 10x the paper's 1e-5 (a whole epoch of the full model)
        assert cli.datamodule.chat_template == "model" and opt.lr == 1e-4
        assert args["finetune"] == {"trainable_blocks": 4} and module.finetune.lora_rank is None
        assert cli.datamodule.tokenizer_path == "models/SmolLM2-135M-Instruct.Q4_1.gguf"
    else:
        assert args["init_from"] == "runs/sft-tiny/checkpoints/last.ckpt"  # the SFT stage's output
        assert module.config.architecture() == LlamaConfig.from_name("tiny").architecture()  # model: null: init_from's
        module.configure_model()
        assert isinstance(module.model.trunk.output, DroppedLMHead)
    if path.stem.endswith("helpful"):
        assert "helpful" in sources[0]["path"] and sources[0]["weight"] == 0.5  # helpfulness data, used whole
    else:
        # safety : helpfulness = 90 : 10. A weight is a fraction of the whole mixture: the paper configs
        # use every safety source whole (no weight) around 10% of helpfulness; the shipped-data configs
        # weight both of their sources
        assert sources[0]["is_safety"] and sources[0].get("weight", 0.9) == 0.9
        assert all("weight" not in s for s in sources if s["is_safety"]) or len(sources) == 2
        assert sum(s["weight"] for s in sources if not s["is_safety"]) == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["tiny-helpful", "tiny-safety"])
def test_tiny_config_fast_dev_run(name: str, tmp_path: Path, tiny_init: Path) -> None:
    raw = yaml.safe_load((ROOT / "configs" / "reward" / f"{name}.yaml").read_text())
    sources = raw["data"]["init_args"]["sources"]
    for s in sources:
        assert (ROOT / s["path"]).is_file()  # the tiny configs use the in-project copies only
        s["limit"] = 30
    cli = lightning_cli(["fit", "--config", str(ROOT / "configs" / "reward" / f"{name}.yaml"),
                         f"--model.init_args.init_from={tiny_init}", f"--data.init_args.sources={json.dumps(sources)}",
                         "--trainer.fast_dev_run=2", f"--trainer.default_root_dir={tmp_path}", *quiet(tmp_path)])
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 2
    assert math.isfinite(float(metrics["train/loss"]))
    assert 0.0 <= float(metrics["val/accuracy"]) <= 1.0
    for s in sources:  # held-out accuracy per source: helpful and harmless separately
        assert f"val/accuracy_by_source/{s['name']}" in metrics
    assert "val/accuracy_by_label/none" in metrics  # HH pairs carry no rating


# ---------------------------------------------------------------------------------------------- loss
def hand_batch(tok: Tokenizer) -> dict:
    texts = [("Hi?", "Hello there.", "Go."), ("Name a fruit.", "An apple.", "A stone."),
             ("Count to two.", "One, two.", "Three."), ("Say yes.", "Yes.", "No, never.")]
    samples = []
    for (q, a, b), label in zip(texts, ["significantly_better", None, "slightly_better", "better"]):
        enc = lambda ans: tok.encode(f"[INST] {q} [/INST] {ans} ", bos=True, eos=True)  # noqa: E731
        samples.append({"chosen": torch.tensor(enc(a)), "rejected": torch.tensor(enc(b)), "margin_label": label,
                        "is_safety": False, "source": 0})
    return collate_preference_pairs(samples, pad_id=tok.pad_id)


@pytest.mark.parametrize("margin, margins", [("small", [1.0, 0.0, 1 / 3, 2 / 3]), ("large", [3.0, 0.0, 1.0, 2.0]),
                                             ("none", [0.0, 0.0, 0.0, 0.0])])
def test_loss_is_the_ranking_loss_with_the_rating_margins(margin: str, margins: list[float], tok: Tokenizer) -> None:
    module = tiny_module(margin)
    batch = hand_batch(tok)
    loss, r_c, r_r = module._step(batch)
    with torch.no_grad():
        scores = module.model(batch["input_ids"], batch["attention_mask"])  # (8,)
    torch.testing.assert_close(r_c.detach(), scores[:4])
    torch.testing.assert_close(r_r.detach(), scores[4:])
    # -log sigmoid(r_c - r_r - m), averaged over the 4 pairs, by hand
    by_hand = sum(-math.log(1 / (1 + math.exp(-(c - r - m))))
                  for c, r, m in zip(scores[:4].tolist(), scores[4:].tolist(), margins)) / 4
    assert float(loss) == pytest.approx(by_hand, rel=1e-5)
    assert float(loss) == pytest.approx(float(ranking_loss(scores[:4], scores[4:], torch.tensor(margins))), rel=1e-6)


def test_chosen_and_rejected_go_through_one_forward(tok: Tokenizer) -> None:
    module = tiny_module()
    calls: list[tuple[int, ...]] = []
    module.model.trunk.tok_embeddings.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    batch = hand_batch(tok)
    loss, _, _ = module._step(batch)
    loss.backward()
    assert calls == [tuple(batch["input_ids"].shape)] and calls[0][0] == 8  # 4 chosen + 4 rejected rows
    assert module.model.head.score.weight.grad is not None


def test_bad_margin_names_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="small, large, none"):
        RewardModule(model="tiny", margin="huge")


def test_warmup_is_three_percent_of_steps_and_at_least_five() -> None:
    module = RewardModule(model="tiny")
    assert [module.optimizer_args.warmup_for(n) for n in (10, 100, 167, 1000)] == [5, 5, 6, 30]


# ---------------------------------------------------------------------------------------------- metrics
def test_ranking_metrics_on_a_hand_made_batch() -> None:
    metrics = RankingMetrics(["alpha", "beta"])
    # gaps r_c - r_r: +1, -1, +0.5, 0 (a tie counts as wrong), +2, -0.5; in two updates
    r_c = torch.tensor([1.0, 0.0, 0.5, 0.3, 2.0, 0.0])
    r_r = torch.tensor([0.0, 1.0, 0.0, 0.3, 0.0, 0.5])
    labels = ["significantly_better", "significantly_better", "better", "slightly_better", None, None]
    sources = torch.tensor([0, 1, 0, 1, 0, 1])
    metrics.update(r_c[:4], r_r[:4], labels[:4], torch.tensor(0.5), sources[:4])
    metrics.update(r_c[4:], r_r[4:], labels[4:], torch.tensor(2.0), sources[4:])
    out = {k: float(v) for k, v in metrics.compute().items()}
    assert out == pytest.approx({
        "accuracy": 3 / 6,
        "score_gap": (1 - 1 + 0.5 + 0 + 2 - 0.5) / 6,
        "loss": (0.5 * 4 + 2.0 * 2) / 6,  # batch means weighted by their pairs
        "accuracy_by_label/significantly_better": 1 / 2,
        "accuracy_by_label/better": 1.0,
        "accuracy_by_label/slightly_better": 0.0,
        "accuracy_by_label/none": 1 / 2,  # no negligibly_better pair: not reported
        "accuracy_by_source/alpha": 1.0,
        "accuracy_by_source/beta": 0.0,
    })
    metrics.reset()
    assert metrics.compute() == {}


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_layout(rm_ckpt: Path, tiny_init: Path) -> None:
    from llama2_lightning import reward_models as scoring

    ckpt = torch.load(rm_ckpt, weights_only=True)
    keys = set(ckpt["state_dict"])
    assert HEAD_KEY in keys and ckpt["state_dict"][HEAD_KEY].shape == (1, 64)
    assert all(k.startswith(TRUNK_PREFIX) or k == HEAD_KEY for k in keys)
    assert TRUNK_PREFIX + "output.weight" not in keys  # the LM head is gone
    assert LlamaConfig.from_dict(ckpt["llama_config"]).architecture() == LlamaConfig.from_name("tiny").architecture()
    info = ckpt["reward_model"]
    assert info["trunk_prefix"] == TRUNK_PREFIX == scoring._TRUNK_PREFIX and HEAD_KEY == scoring._HEAD_KEY
    assert info["pad_id"] == 0 and Path(info["tokenizer_path"]) == TOKENIZER and info["init_from"] == str(tiny_init)
    # self-contained: `validate --ckpt_path` rebuilds the module from these, without the init checkpoint
    hparams = ckpt["hyper_parameters"]
    assert hparams["init_from"] is None and LlamaConfig.from_dict(hparams["model"]).architecture() == \
        LlamaConfig.from_name("tiny").architecture()
    assert scoring.is_reward_checkpoint(rm_ckpt) and not scoring.is_reward_checkpoint(tiny_init)
    with pytest.raises(ValueError, match="not a reward model"):
        scoring.read_reward_checkpoint(tiny_init)  # an SFT-like LM goes to init_from, not to scoring
    # A reward checkpoint is also a valid init_from (head kept): continue or evaluate a reward model.
    module = RewardModule(model=None, init_from=str(rm_ckpt))
    module.configure_model()
    torch.testing.assert_close(module.model.head.score.weight, ckpt["state_dict"][HEAD_KEY])
    torch.testing.assert_close(module.model.trunk.layers[1].attention.wk.weight,
                               ckpt["state_dict"][TRUNK_PREFIX + "layers.1.attention.wk.weight"])


def test_export_matches_transformers_sequence_classification(rm_ckpt: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from safetensors import safe_open

    from llama2_lightning.reward_models import load_reward_model

    dst = tmp_path / "hf-rm"
    assert main(["export-rm", str(rm_ckpt), str(dst)]) == 0
    hf_config = json.loads((dst / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForSequenceClassification"]
    assert hf_config["num_labels"] == 1 and hf_config["pad_token_id"] == 0
    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert tuple(f.get_tensor("score.weight").shape) == (1, 64)
    assert "lm_head.weight" not in names and all(n.startswith("model.") or n == "score.weight" for n in names)
    assert (dst / "tokenizer.model").is_file()

    ours, _ = load_reward_model(rm_ckpt)
    hf = transformers.LlamaForSequenceClassification.from_pretrained(dst, dtype=torch.float32).eval()
    # Right padding with the pad id (0); real tokens never use it, so HF finds each row's last token.
    g = torch.Generator().manual_seed(0)
    lengths = [7, 13, 3, 10]
    tokens = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    for i, n in enumerate(lengths):
        tokens[i, :n] = torch.randint(3, 2048, (n,), generator=g)
        mask[i, :n] = True
    with torch.no_grad():
        expected = hf(tokens, attention_mask=mask.long()).logits[:, 0]
        torch.testing.assert_close(ours(tokens, mask), expected, atol=1e-4, rtol=1e-4)
        assert float(expected.std()) > 1e-3  # distinct rows, not a constant
        # and the export loads back into our model with the same scores
        again, _ = load_reward_model(dst)
        torch.testing.assert_close(again(tokens, mask), expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- scoring
def test_score_pairs_prints_accuracy_as_its_last_line(rm_ckpt: Path, pair_files: dict[str, Path], tmp_path: Path,
                                                      tok: Tokenizer, capsys: pytest.CaptureFixture[str]) -> None:
    from llama2_lightning.reward_models import load_reward_model, score

    pairs = made_up_pairs(10, seed=3)
    pairs[0] = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                             {"role": "user", "content": "Any advice?"}], "chosen": "thank you, rest well",
                "rejected": "go away now"}
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    hh_raw = [("What is bread?", "Baked dough, thank you.", "go away"), ("Tell a story.", "Once upon a time.", "No.")]
    hh = write_jsonl(tmp_path / "hh.jsonl.gz", [
        {"chosen": f"\n\nHuman: {q}\n\nAssistant: {a}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {b}"}
        for q, a, b in hh_raw], gz=True)
    assert main(["score-pairs", "--checkpoint", str(rm_ckpt), "--tokenizer", str(TOKENIZER), str(jsonl), str(hh)]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out.strip().splitlines()[-1])
    assert "scored 12/12 pairs" in out.err

    # independently: each side scored alone with score()
    prompts = [p.get("messages") or p["prompt"] for p in pairs] + [q for q, _, _ in hh_raw]
    chosen = [p["chosen"] for p in pairs] + [a for _, a, _ in hh_raw]
    rejected = [p["rejected"] for p in pairs] + [b for _, _, b in hh_raw]
    model, _ = load_reward_model(rm_ckpt)
    s_c, _ = score(model, tok, prompts, chosen, batch_size=5)
    s_r, _ = score(model, tok, prompts, rejected, batch_size=3)
    gap = s_c - s_r
    assert result["pairs"] == 12
    assert result["accuracy"] == pytest.approx(float((gap > 0).float().mean()))
    assert result["mean_margin"] == pytest.approx(float(gap.mean()), abs=1e-5)


def test_score_command_prints_score_and_sigmoid(rm_ckpt: Path, tok: Tokenizer,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from llama2_lightning.reward_models import load_reward_model, score

    answers = ["thank you, the river is long", "go away", "stone paper"]
    # no --tokenizer: the one the checkpoint was trained with is recorded in it
    assert main(["score", "--checkpoint", str(rm_ckpt), "--prompt", "Tell me about the river.",
                 *[a for ans in answers for a in ("--answer", ans)]]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    model, _ = load_reward_model(rm_ckpt)
    scores, probs = score(model, tok, ["Tell me about the river."] * 3, answers)
    assert [d["answer"] for d in lines] == answers
    assert [d["score"] for d in lines] == pytest.approx(scores.tolist(), abs=1e-5)
    assert [d["sigmoid"] for d in lines] == pytest.approx(torch.sigmoid(scores).tolist(), abs=1e-6)
    assert probs.tolist() == pytest.approx(torch.sigmoid(scores).tolist())
    # a score does not depend on the batch it is computed in
    alone = torch.cat([score(model, tok, ["Tell me about the river."], [a])[0] for a in answers])
    torch.testing.assert_close(alone, scores, atol=1e-5, rtol=1e-5)


def test_validate_reports_accuracy_on_extra_preference_files(rm_ckpt: Path, tmp_path: Path,
                                                             pair_files: dict[str, Path], tok: Tokenizer) -> None:
    from llama2_lightning.reward_models import load_reward_model, score

    sources = [{"path": str(pair_files["train"]), "name": "made_up"}]
    val_sources = [{"path": str(pair_files["eval"]), "name": "extra"}]
    cli = lightning_cli(["validate", "--config", str(ROOT / "configs" / "reward" / "tiny-helpful.yaml"),
                         f"--ckpt_path={rm_ckpt}",  # no init_from: the config's SFT path need not exist
                         f"--data.init_args.sources={json.dumps(sources)}",
                         f"--data.init_args.val_sources={json.dumps(val_sources)}",
                         f"--data.init_args.tokenizer_path={TOKENIZER}", "--data.init_args.max_seq_len=64",
                         f"--trainer.default_root_dir={tmp_path}", *quiet(tmp_path)])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}

    records = [json.loads(line) for line in pair_files["eval"].read_text().splitlines()]
    model, _ = load_reward_model(rm_ckpt)
    prompts = [r["prompt"] for r in records]
    gap = score(model, tok, prompts, [r["chosen"] for r in records])[0] - \
        score(model, tok, prompts, [r["rejected"] for r in records])[0]
    assert metrics["val/accuracy_by_source/extra"] == pytest.approx(float((gap > 0).float().mean()))
    assert "val/accuracy_by_source/made_up" in metrics and "val/accuracy" in metrics



def _score_gaps(pairs_file: Path, pairs: Any, checkpoint: Path, tok: Tokenizer) -> tuple[list[dict], torch.Tensor]:
    """The held-out records of ``pairs`` and each one's ``r_chosen - r_rejected``, scored apart from the
    module by ``reward_models.score`` on the checkpoint."""
    records = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    held_out = [records[p.line - 1] for p in pairs]
    model, _ = load_reward_model(checkpoint)
    prompts = [r["prompt"] for r in held_out]
    gap = score(model, tok, prompts, [r["chosen"] for r in held_out])[0] - \
        score(model, tok, prompts, [r["rejected"] for r in held_out])[0]
    return held_out, gap

def test_per_label_validation_accuracy_matches_independent_scores(rm_ckpt: Path, pair_files: dict[str, Path],
                                                                   tok: Tokenizer) -> None:
    module = RewardModule(model=None, init_from=str(rm_ckpt))
    dm = PreferenceDataModule([{"path": str(pair_files["eval"]), "name": "eval"}], tokenizer_path=str(TOKENIZER),
                              max_seq_len=64, batch_size=5, val_fraction=0.5)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    [logged] = trainer.validate(module, datamodule=dm)

    held_out, gap = _score_gaps(pair_files["eval"], dm.val_dataset.pairs, rm_ckpt, tok)
    assert logged["val/accuracy"] == pytest.approx(float((gap > 0).float().mean()))
    assert logged["val/score_gap"] == pytest.approx(float(gap.mean()), abs=1e-5)
    for label in {r["margin_label"] for r in held_out}:
        rows = [i for i, r in enumerate(held_out) if r["margin_label"] == label]
        key = f"val/accuracy_by_label/{label or 'none'}"
        assert logged[key] == pytest.approx(float((gap[rows] > 0).float().mean())), key
    margins = torch.tensor([{"significantly_better": 1.0, "better": 2 / 3, "slightly_better": 1 / 3}
                            .get(r["margin_label"], 0.0) for r in held_out])
    assert logged["val/loss"] == pytest.approx(float(-F.logsigmoid(gap - margins).mean()), abs=1e-5)


# ---------------------------------------------------------------------------------------------- learning
def test_training_learns_a_preference_pattern(tmp_path: Path, tiny_init: Path) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", made_up_pairs(320, seed=7))
    L.seed_everything(0)
    module = RewardModule(model=None, init_from=str(tiny_init), optimizer=OptimizerArgs(lr=3e-3, warmup_steps=5,
                                                                                         warmup_ratio=0.03))
    dm = PreferenceDataModule([{"path": str(data)}], tokenizer_path=str(TOKENIZER), max_seq_len=64, batch_size=16,
                              val_fraction=0.2)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    [before] = trainer.validate(module, datamodule=dm)
    trainer.fit(module, datamodule=dm)
    [after] = trainer.validate(module, datamodule=dm)
    assert len(dm.val_dataset) == 64  # held out: never trained on
    assert after["val/accuracy"] >= 0.85 and after["val/accuracy"] > before["val/accuracy"] + 0.2, (before, after)
    assert after["val/score_gap"] > 1.0


# ---------------------------------------------------------------------------------------------- sharding
class ShardRecorder(L.Callback):
    """Run inside the FSDP test's processes (imported as ``test_reward.ShardRecorder``): records
    whether every parameter, the head's included, is a sharded DTensor, and the synced metrics."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from torch.distributed.tensor import DTensor

        model = pl_module.model
        record = {
            "world_size": trainer.world_size,
            "head_sharded": isinstance(model.head.score.weight, DTensor),
            "all_sharded": all(isinstance(p, DTensor) for p in model.parameters()),
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_fsdp_two_processes_shard_the_trunk_and_the_head(tmp_path: Path, tiny_init: Path,
                                                         pair_files: dict[str, Path], tok: Tokenizer) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "llama2_lightning.cli", "fit", "--config", str(ROOT / "configs/reward/tiny-helpful.yaml"),
         f"--model.init_args.init_from={tiny_init}", "--model.init_args.optimizer.lr=1e-3",
         f"--data.init_args.sources={json.dumps([{'path': str(pair_files['train'])}])}",
         f"--data.init_args.tokenizer_path={TOKENIZER}", "--data.init_args.max_seq_len=64",
         "--data.init_args.batch_size=4", "--data.init_args.val_fraction=0.1", "--trainer.devices=2",
         "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
         "--trainer.strategy.data_parallel_size=2", "--trainer.strategy.tensor_parallel_size=1",
         f"--trainer.default_root_dir={tmp_path}", *quiet(tmp_path),
         "--trainer.callbacks+=test_reward.ShardRecorder", f"--trainer.callbacks.out_dir={tmp_path / 'rec'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / "rec" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["all_sharded"] and r["head_sharded"] for r in ranks)
    # held-out metrics are reduced over both ranks' halves of the held-out set ...
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    # ... and equal what the final (sharded, then consolidated) checkpoint scores on the whole set.
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and (ckpt / "meta.pt").is_file()
    dm = PreferenceDataModule([{"path": str(pair_files["train"])}], tokenizer_path=str(TOKENIZER), max_seq_len=64,
                              val_fraction=0.1)  # the run's held-out split
    held_out, gap = _score_gaps(pair_files["train"], dm.heldout_dataset.pairs, ckpt, tok)
    assert len(held_out) % 2 == 0  # no sample duplicated by the distributed sampler's padding
    assert ranks[0]["metrics"]["val/accuracy"] == pytest.approx(float((gap > 0).float().mean()))
    assert ranks[0]["metrics"]["val/score_gap"] == pytest.approx(float(gap.mean()), abs=1e-4)
