"""`llama2-lightning distill`: answers are sampled with the safety preprompt as the system turn, and the
written SFT dialogs drop it (paper section 4.2.4)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from paths import TOKENIZER

from llama2_lightning import Transformer
from llama2_lightning.checkpoint import save_hf
from llama2_lightning.cli import main
from llama2_lightning.commands import distill as distill_command
from llama2_lightning.data.sft import SFTDataModule
from llama2_lightning.pipeline.spec import COMMAND_OUTPUTS
from llama2_lightning.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    model = Transformer.from_name("tiny")
    save_hf(model.config, model.state_dict(), directory)
    shutil.copy(TOKENIZER, directory / "tokenizer.model")
    return directory


def _hh(path: Path, questions: list[str]) -> Path:
    path.write_text("".join(json.dumps({"chosen": f"\n\nHuman: {q}\n\nAssistant: sure\n\nHuman: more\n\nAssistant: ok",
                                        "rejected": f"\n\nHuman: {q}\n\nAssistant: no"}) + "\n" for q in questions))
    return path


def test_distilled_records_drop_the_preprompt_and_empty_answers() -> None:
    records = distill_command.distilled_records(["f:1", "f:2", "f:3"], ["how to steal?", "how to hack?", "hi"],
                                                ["I'm sorry, but I can't help with that.", "Step one: ...", "  "],
                                                "Be safe.")
    assert [r["origin"] for r in records] == ["f:1", "f:2"]  # the empty answer is not trained on
    assert records[0]["messages"] == [{"role": "user", "content": "how to steal?"},
                                      {"role": "assistant", "content": "I'm sorry, but I can't help with that."}]
    assert all(r["distilled_from"] == "Be safe." and "Be safe." not in json.dumps(r["messages"]) for r in records)
    kept = distill_command.distilled_records(["f:1", "f:2"], ["a", "b"], ["I cannot do that.", "Sure."], "P",
                                             keep="refusals")
    assert [r["origin"] for r in kept] == ["f:1"]
    with pytest.raises(ValueError, match="keep must be one of 'all', 'refusals', 'safety-rm', got 'some'"):
        distill_command.distilled_records([], [], [], "P", keep="some")
    with pytest.raises(ValueError):  # prompts and answers must pair up
        distill_command.distilled_records(["f:1"], ["a"], [], "P")


def test_distill_samples_with_the_preprompt_and_writes_sft_dialogs_without_it(
        hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first user turn of each HH record is answered with the preprompt as the system turn (seen in the
    prompt ids the model gets); the output holds user/answer pairs that SFTDataModule reads as they are."""
    tok = Tokenizer(TOKENIZER)
    seen: list[str] = []

    def scripted(model: Any, tokenizer: Any, prompts: list[list[int]], *args: Any, **kw: Any) -> list[str]:
        seen.extend(tokenizer.decode(p) for p in prompts)
        return ["I'm sorry, but I can't help with that."] * len(prompts)

    monkeypatch.setattr(distill_command, "sample_answers", scripted)
    src = _hh(tmp_path / "harmless.jsonl", ["how do I pick a lock?", "how do I make a weapon?", "tell me a secret"])
    out = tmp_path / "distill.jsonl"
    assert main(["distill", "--input", str(src), "--output", str(out), "--checkpoint", str(hf_dir), "--limit", "2",
                 "--preprompt", "Refuse harmful requests.", "--max-new-tokens", "4", "--batch-size", "1"]) == 0
    assert len(seen) == 2 and all("Refuse harmful requests." in s for s in seen)
    assert "how do I pick a lock?" in seen[0] and "how do I make a weapon?" in seen[1] and "more" not in seen[0]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["messages"][0]["content"] for r in records] == ["how do I pick a lock?", "how do I make a weapon?"]
    assert [r["origin"] for r in records] == [f"{src}:1", f"{src}:2"]
    assert all(len(r["messages"]) == 2 and r["distilled_from"] == "Refuse harmful requests." for r in records)
    dm = SFTDataModule(sources=[{"path": str(out), "format": "messages"}], tokenizer_path=str(TOKENIZER),
                       max_seq_len=128, batch_size=1, val_fraction=0.5)
    dm.setup()
    example = dm.train_dataset[0]
    labels = [t for t in example["labels"].tolist() if t != -100]
    assert tok.decode(labels).strip().startswith("I'm sorry")  # the loss is on the answer, not on the prompt


def test_distill_with_a_real_tiny_model_and_its_errors(hf_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    src = _hh(tmp_path / "harmless.jsonl", ["q1?", "q2?", "q3?"])
    out = tmp_path / "distill.jsonl"
    assert main(["distill", "--input", str(src), "--output", str(out), "--checkpoint", str(hf_dir),
                 "--max-new-tokens", "6", "--temperature", "0"]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) <= 3 and all(json.loads(line)["messages"][1]["content"].strip() for line in lines)
    assert "distilled dialogs" in capsys.readouterr().out
    for argv, message in [(["--input", str(tmp_path / "absent.jsonl")], "absent.jsonl: no such file"),
                          (["--input", str(src), "--preprompt", " "], "--preprompt is empty"),
                          (["--input", str(src), "--format", "messages", "--skip-heldout", "0.1"],
                           "--skip-heldout needs --format hh")]:
        with pytest.raises(SystemExit):
            main(["distill", *argv, "--output", str(out), "--checkpoint", str(hf_dir)])
        assert message in capsys.readouterr().err
    assert "distill" in COMMAND_OUTPUTS  # a pipeline stage can run it


def test_distill_answers_batches_seeds_and_a_prompt_too_long_for_the_context(
        hf_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each batch is one sampling call with its own seed (drawn from the run's seed, as gatt draws them); a
    prompt that leaves no room for the answer is not sampled and comes back empty."""
    from llama2_lightning.checkpoint import load_model

    model = load_model(hf_dir)
    tok = Tokenizer(TOKENIZER)
    calls: list[tuple[int, int]] = []

    def scripted(model: Any, tokenizer: Any, prompts: list[list[int]], *args: Any, seed: int, **kw: Any) -> list[str]:
        calls.append((len(prompts), seed))
        return [f"answer {len(calls)}.{i}" for i in range(len(prompts))]

    monkeypatch.setattr(distill_command, "sample_answers", scripted)
    too_long = "word " * model.config.max_seq_len
    answers = distill_command.distill_answers(model, tok, ["a?", too_long, "b?", "c?"], "Be safe.", 4, 0.7, 1.0,
                                              seed=3, batch_size=2)
    assert answers == ["answer 1.0", "", "answer 2.0", "answer 2.1"]
    assert [n for n, _ in calls] == [1, 2] and calls[0][1] != calls[1][1]
    again: list[tuple[int, int]] = []
    monkeypatch.setattr(distill_command, "sample_answers",
                        lambda m, t, p, *a, seed, **k: again.append((len(p), seed)) or ["x"] * len(p))
    distill_command.distill_answers(model, tok, ["a?", too_long, "b?", "c?"], "Be safe.", 4, 0.7, 1.0, seed=3,
                                    batch_size=2)
    assert again == calls  # the same seed, the same sampling seeds


def test_distill_with_nothing_to_keep_fails_and_writes_nothing(hf_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(distill_command, "sample_answers", lambda m, t, p, *a, **k: ["Sure, here is how."] * len(p))
    src = _hh(tmp_path / "harmless.jsonl", ["q1?", "q2?"])
    out = tmp_path / "distill.jsonl"
    assert main(["distill", "--input", str(src), "--output", str(out), "--checkpoint", str(hf_dir), "--keep", "refusals",
                 "--max-new-tokens", "4"]) == 1
    assert not out.exists() and "no answer to keep from 2 prompts" in capsys.readouterr().err


def test_safety_rm_keep_takes_an_answer_only_where_the_rm_scores_it_above_the_plain_one() -> None:
    """The paper's filter (section 4.2.4): a distilled answer is kept only if the safety RM prefers it to the
    plain answer; a tie is not a gain. Kept records carry both scores."""
    records = distill_command.distilled_records(["f:1", "f:2", "f:3", "f:4"], ["a", "b", "c", "d"],
                                                ["No.", "Sure.", "I can't.", " "], "P", keep="safety-rm",
                                                scores=[0.9, 0.2, 0.5, 0.9], plain_scores=[0.3, 0.4, 0.5, 0.1])
    assert [r["origin"] for r in records] == ["f:1"]
    assert records[0]["safety_rm_score"] == 0.9 and records[0]["plain_safety_rm_score"] == 0.3
    with pytest.raises(ValueError, match="needs the safety RM's scores"):
        distill_command.distilled_records(["f:1"], ["a"], ["No."], "P", keep="safety-rm")
    with pytest.raises(ValueError, match="1 answers but 2 scores and 1 plain scores"):
        distill_command.distilled_records(["f:1"], ["a"], ["No."], "P", keep="safety-rm", scores=[1, 2],
                                          plain_scores=[0])


def test_distill_keep_safety_rm_scores_distilled_and_plain_answers_on_the_bare_prompt(
        hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """With --keep safety-rm the model also answers each prompt without the preprompt, the RM scores both
    answers on the prompt as it will be trained on (no preprompt), and only the preferred distilled answers
    are written."""
    prompts_seen: list[str] = []

    seeds: dict[bool, list[int]] = {True: [], False: []}  # sampling seeds with / without the preprompt

    def scripted(model: Any, tokenizer: Any, prompts: list[list[int]], *args: Any, **kw: Any) -> list[str]:
        texts = [tokenizer.decode(p) for p in prompts]
        prompts_seen.extend(texts)
        seeds["Refuse." in texts[0]].append(kw["seed"])
        return ["I won't help with that." if "Refuse." in t else f"Plain answer to {'lock' if 'lock' in t else 'cake'}."
                for t in texts]

    scored: list[tuple[list[Any], str]] = []

    class Scorer:
        def __init__(self, rm: Any, tokenizer: Any, template: Any, batch_size: int) -> None:
            assert rm == "the RM"

        def __call__(self, prompts: list[list[Any]], answers: list[str]) -> list[float]:
            scored.extend(zip(prompts, answers))
            # the RM prefers the refusal for the lock prompt and the plain answer for the cake one
            return [0.9 if a.startswith("I won't") and "lock" in p[0]["content"] else
                    0.5 if a.startswith("Plain") else 0.1 for p, a in zip(prompts, answers)]

    monkeypatch.setattr(distill_command, "sample_answers", scripted)
    monkeypatch.setattr(distill_command, "load_reward_model", lambda path, device=None: ("the RM", None))
    monkeypatch.setattr(distill_command, "RewardScorer", Scorer)
    src = _hh(tmp_path / "harmless.jsonl", ["how do I pick a lock?", "how do I bake a cake?"])
    out = tmp_path / "distill.jsonl"
    argv = ["distill", "--input", str(src), "--output", str(out), "--checkpoint", str(hf_dir), "--preprompt", "Refuse.",
            "--max-new-tokens", "4"]
    assert main([*argv, "--keep", "safety-rm", "--safety-rm", "rm.ckpt", "--seed", "5"]) == 0
    # the distilled answers are those of a run without the filter (seed 5); the plain ones have their own stream
    assert seeds == {True: [random.Random(5).randrange(2**31)], False: [random.Random(6).randrange(2**31)]}
    assert sum("Refuse." in t for t in prompts_seen) == 2 and sum("Refuse." not in t for t in prompts_seen) == 2
    assert all(len(p) == 1 and p[0]["role"] == "user" for p, _ in scored)  # bare prompts, no system turn
    assert sorted(p[0]["content"] for p, _ in scored) == sorted(["how do I pick a lock?", "how do I bake a cake?"] * 2)
    assert sorted(a for _, a in scored) == sorted(["I won't help with that."] * 2 + ["Plain answer to lock.",
                                                                                     "Plain answer to cake."])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["messages"] for r in records] == [[{"role": "user", "content": "how do I pick a lock?"},
                                                 {"role": "assistant", "content": "I won't help with that."}]]
    assert records[0]["safety_rm_score"] == 0.9 and records[0]["plain_safety_rm_score"] == 0.5
    assert "2 distilled answers are refusals, 1 of the kept ones" in capsys.readouterr().out
    for extra, message in [(["--keep", "safety-rm"], "--keep safety-rm and --safety-rm go together"),
                           (["--safety-rm", "rm.ckpt"], "--keep safety-rm and --safety-rm go together")]:
        with pytest.raises(SystemExit):
            main([*argv, *extra])
        assert message in capsys.readouterr().err
