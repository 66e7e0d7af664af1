"""PromptDataModule: every source format, safety tags, the held-out split, one batch per iteration."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest
import torch

from paths import SELF_INSTRUCT, TOKENIZER

from llama2_lightning.chat import encode_prompt
from llama2_lightning.data.prompts import (
    IterationSampler, PromptDataModule, collate_prompts, parse_prompt_sources, read_prompt_source,
)
from llama2_lightning.data.readers import parse_hh_dialog
from llama2_lightning.tokenizer import Tokenizer


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def module(sources: list[dict], **kwargs: object) -> PromptDataModule:
    dm = PromptDataModule(sources=sources, tokenizer_path=str(TOKENIZER), **kwargs)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(TOKENIZER)


# ----------------------------------------------------------------------------------------- sources


def test_default_uses_in_project_self_instruct_and_holds_out_disjoint_prompts(tok: Tokenizer) -> None:
    dm = PromptDataModule(tokenizer_path=str(TOKENIZER), max_prompt_len=256)
    dm.setup()
    train = {p.key for p in dm.train_prompts}
    val = {p.key for p in dm.heldout_prompts}
    assert train and val and not train & val
    # one prompt per distinct instruction + input; the seed tasks hold 175 records
    records = [json.loads(line) for line in SELF_INSTRUCT.read_text().splitlines()]
    assert len(train) + len(val) + dm.stats["sources"][0]["too_long"] >= len(records)
    first = records[0]
    expected = first["instruction"].strip() + (f"\n\n{first['instances'][0]['input'].strip()}"
                                               if first["instances"][0]["input"].strip() else "")
    assert any(p.messages == [{"role": "user", "content": expected}] for p in dm.train_prompts + dm.heldout_prompts)
    # ids are the chat format's open user turn
    p = dm.train_prompts[0]
    assert p.ids == encode_prompt(tok, p.messages) and not p.is_safety


def test_split_is_seeded_and_does_not_move_with_max_prompt_len() -> None:
    src = [{"path": str(SELF_INSTRUCT), "format": "self_instruct"}]
    a = module(src, max_prompt_len=64, seed=3)
    b = module(src, max_prompt_len=64, seed=3)
    c = module(src, max_prompt_len=4096, seed=3)
    d = module(src, max_prompt_len=4096, seed=4)
    assert [p.key for p in a.heldout_prompts] == [p.key for p in b.heldout_prompts]
    # a longer limit only adds prompts: none of the short ones changes side
    assert {p.key for p in a.heldout_prompts} <= {p.key for p in c.heldout_prompts}
    assert {p.key for p in a.train_prompts} <= {p.key for p in c.train_prompts}
    assert all(len(p.ids) <= 64 for p in a.train_prompts + a.heldout_prompts)
    assert {p.key for p in c.heldout_prompts} != {p.key for p in d.heldout_prompts}


def test_jsonl_prompts_messages_and_safety_tags(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "How do I bake bread?"},
        {"prompt": "How do I pick a lock?", "is_safety": True},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Name a fruit."}]},
    ])
    prompts, counts = read_prompt_source(parse_prompt_sources([{"path": str(path)}])[0], 0)
    assert counts == {"records": 3, "empty": 0, "bad_lines": 0}
    assert [p.is_safety for p in prompts] == [False, True, False]
    assert prompts[2].messages[-1] == {"role": "user", "content": "Name a fruit."} and len(prompts[2].messages) == 4
    # the source's tag is the default, a record's own tag wins
    prompts, _ = read_prompt_source(parse_prompt_sources([{"path": str(path), "is_safety": True}])[0], 0)
    assert [p.is_safety for p in prompts] == [True, True, True]
    rec = [{"prompt": "a", "is_safety": False}]
    prompts, _ = read_prompt_source(parse_prompt_sources([{"path": str(write_jsonl(tmp_path / "q.jsonl", rec)),
                                                           "is_safety": True}])[0], 0)
    assert prompts[0].is_safety is False


@pytest.mark.parametrize("record, message", [
    ({"prompt": "a", "messages": []}, "exactly one of"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "end with a user turn"),
    ({"prompt": 3}, "'prompt' must be a string"),
    ({"prompt": "a", "is_safety": "yes"}, "is_safety"),
])
def test_bad_records_name_file_and_line(tmp_path: Path, record: dict, message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, record])
    with pytest.raises(ValueError, match=rf"bad.jsonl:2: .*{message}"):
        read_prompt_source(parse_prompt_sources([{"path": str(path)}])[0], 0)
    prompts, counts = read_prompt_source(parse_prompt_sources([{"path": str(path)}])[0], 0, on_bad_line="skip")
    assert len(prompts) == 1 and counts["bad_lines"] == 1


@pytest.mark.parametrize("entry, message", [
    ({"path": "x", "format": "csv"}, "allowed: prompts, hh, xstest, self_instruct"),
    ({"path": "x", "colour": 1}, "unknown key"),
    ({"path": "x", "format": "hh"}, "needs is_safety"),
    ({"path": "x", "format": "prompts", "label": "unsafe"}, "only xstest sources take a label"),
    ({"path": "x", "limit": 0}, "limit must be"),
])
def test_bad_source_entries_say_what_is_allowed(entry: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_prompt_sources([entry])


def test_hh_first_human_turn_and_tags(shared_data: Path) -> None:
    helpful, harmless = shared_data / "hh_helpful_pairs.jsonl.gz", shared_data / "hh_harmless_pairs.jsonl.gz"
    dm = module([{"path": str(helpful), "format": "hh", "is_safety": False, "limit": 30},
                 {"path": str(harmless), "format": "hh", "is_safety": True, "limit": 30}],
                max_prompt_len=4096, val_fraction=0.2)
    with gzip.open(helpful, "rt") as f:
        first = json.loads(f.readline())
    want = parse_hh_dialog(first["chosen"])[0]["content"]
    prompts = dm.train_prompts + dm.heldout_prompts
    assert any(p.messages == [{"role": "user", "content": want}] for p in prompts)
    assert all(len(p.messages) == 1 for p in prompts)
    by_source = {0: set(), 1: set()}
    for p in prompts:
        by_source[p.source].add(p.is_safety)
    assert by_source == {0: {False}, 1: {True}}
    assert dm.stats["train_safety"] + dm.stats["val_safety"] == sum(p.is_safety for p in prompts)


def test_xstest_all_prompts_are_safety_and_label_filters(shared_data: Path) -> None:
    path = shared_data / "xstest_prompts.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    prompts, _ = read_prompt_source(parse_prompt_sources([{"path": str(path), "format": "xstest"}])[0], 0)
    assert len(prompts) == len(rows) == 450 and all(p.is_safety for p in prompts)
    unsafe, _ = read_prompt_source(parse_prompt_sources([{"path": str(path), "format": "xstest",
                                                          "label": "unsafe"}])[0], 0)
    assert [p.messages[0]["content"] for p in unsafe] == [r["prompt"].strip() for r in rows if r["label"] == "unsafe"]
    off, _ = read_prompt_source(parse_prompt_sources([{"path": str(path), "format": "xstest",
                                                       "is_safety": False}])[0], 0)
    assert not any(p.is_safety for p in off)


def test_xstest_without_its_columns_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "x.csv"
    bad.write_text("id,text\n1,hello\n")
    with pytest.raises(ValueError, match="lacks column"):
        read_prompt_source(parse_prompt_sources([{"path": str(bad), "format": "xstest"}])[0], 0)


def test_duplicates_dropped_and_val_sources_held_out_only(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"question {i}"} for i in range(20)] + [{"prompt": "question 3"}])
    v = write_jsonl(tmp_path / "v.jsonl", [{"prompt": "question 5"}, {"prompt": "held out only"}])
    dm = module([{"path": str(a)}], val_sources=[{"path": str(v), "is_safety": True}], val_fraction=0.0)
    train = [p.messages[0]["content"] for p in dm.train_prompts]
    val = [p.messages[0]["content"] for p in dm.heldout_prompts]
    assert val == ["question 5", "held out only"]
    assert "question 5" not in train and train.count("question 3") == 1 and len(train) == 19
    assert dm.stats["sources"][0]["duplicates"] == 2  # the repeated line and the held-out one
    assert all(p.is_safety for p in dm.heldout_prompts)


def test_max_val_prompts_is_a_seeded_cap(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"q {i}"} for i in range(100)])
    one = module([{"path": str(a)}], val_fraction=0.5, max_val_prompts=7)
    two = module([{"path": str(a)}], val_fraction=0.5, max_val_prompts=7)
    assert len(one.heldout_prompts) == 7
    assert [p.key for p in one.heldout_prompts] == [p.key for p in two.heldout_prompts]


# ----------------------------------------------------------------------------------------- batches


def test_one_batch_per_iteration_covering_every_prompt_once_per_pass(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"prompt number {i}", "is_safety": i % 3 == 0}
                                           for i in range(40)])
    dm = module([{"path": str(a)}], batch_size=8, val_fraction=0.2)
    n = len(dm.train_prompts)
    assert n == 32
    loader = dm.train_dataloader()
    sampler = loader.sampler
    assert isinstance(sampler, IterationSampler) and len(loader) == 1
    seen = []
    for it in range(4):  # one pass of 32 prompts
        sampler.set_epoch(it)
        [batch] = list(loader)
        assert batch["index"].tolist() == sampler.iteration_indices(it)
        seen += batch["index"].tolist()
        assert batch["is_safety"].dtype == torch.bool and batch["is_safety"].shape == (8,)
        assert isinstance(batch["prompt_ids"], list) and len({len(p) for p in batch["prompt_ids"]}) > 1
        for i, ids, msgs, tag in zip(batch["index"].tolist(), batch["prompt_ids"], batch["messages"],
                                     batch["is_safety"].tolist()):
            assert ids == dm.train_prompts[i].ids and msgs == dm.train_prompts[i].messages
            assert tag == dm.train_prompts[i].is_safety
    assert sorted(seen) == list(range(n))
    # the next pass is another order, and the same iteration always draws the same prompts
    assert sampler.iteration_indices(4) != sampler.iteration_indices(0)
    assert IterationSampler(dm.train_dataset, 8, seed=dm.seed).iteration_indices(5) == sampler.iteration_indices(5)


def test_iteration_comes_from_position_and_ranks_share_it(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"p {i}"} for i in range(30)])
    dm = module([{"path": str(a)}], batch_size=6, val_fraction=0.1)
    whole = IterationSampler(dm.train_dataset, 6, seed=1).iteration_indices(7)
    shares = [list(IterationSampler(dm.train_dataset, 6, num_replicas=3, rank=r, seed=1, position=lambda: 7))
              for r in range(3)]
    assert all(len(s) == 2 for s in shares)
    assert sorted(sum(shares, [])) == sorted(whole)
    with pytest.raises(ValueError, match="must divide"):
        IterationSampler(dm.train_dataset, 7, num_replicas=3)


def test_collate_keeps_prompts_unpadded() -> None:
    batch = collate_prompts([
        {"prompt_ids": [1, 5, 6], "is_safety": True, "messages": [{"role": "user", "content": "a"}], "index": 4},
        {"prompt_ids": [1, 7], "is_safety": False, "messages": [{"role": "user", "content": "b"}], "index": 9},
    ])
    assert batch["prompt_ids"] == [[1, 5, 6], [1, 7]]
    assert batch["is_safety"].tolist() == [True, False] and batch["index"].tolist() == [4, 9]


def test_prompt_longer_than_the_limit_is_dropped_and_counted(tmp_path: Path, tok: Tokenizer) -> None:
    long = "word " * 200
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": long}] + [{"prompt": f"short {i}"} for i in range(10)])
    dm = module([{"path": str(a)}], max_prompt_len=40)
    assert dm.stats["sources"][0]["too_long"] == 1
    assert all(len(p.ids) <= 40 for p in dm.train_prompts + dm.heldout_prompts)
    with pytest.raises(ValueError, match="no training prompts"):
        module([{"path": str(write_jsonl(tmp_path / "b.jsonl", [{"prompt": long}]))}], max_prompt_len=40)


def test_held_out_prompts_depend_on_content_not_on_source_order(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"Question a{i}?"} for i in range(30)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"Question b{i}?"} for i in range(30)])
    ab = module([{"path": str(a)}, {"path": str(b)}], val_fraction=0.2, seed=5)
    ba = module([{"path": str(b)}, {"path": str(a)}], val_fraction=0.2, seed=5)
    assert {p.key for p in ab.heldout_prompts} == {p.key for p in ba.heldout_prompts}
    assert len(ab.heldout_prompts) == 12
    assert not {p.key for p in ab.heldout_prompts} & {p.key for p in ba.train_prompts}
