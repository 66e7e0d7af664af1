"""PreferenceDataModule: formats, HH adapter on the shipped files, truncation, held-out split,
mixing proportions, the 2B-row collate layout, and bad-line handling."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from paths import TOKENIZER

from llama2_lightning.chat import encode_dialog, truncate_pair
from llama2_lightning.config import LlamaConfig
from llama2_lightning.data.preference import (
    MARGIN_LABELS, PreferenceDataModule, collate_preference_pairs, mixture_counts,
)
from llama2_lightning.scalar_model import ScalarModel
from llama2_lightning.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(TOKENIZER)


def write_jsonl(path: Path, records: list[object], gz: bool = False) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def numbered_pairs(n: int, tag: str) -> list[dict]:
    """``n`` distinct pairs whose chosen answer names their source and number, for counting."""
    return [{"prompt": f"Question {tag} {i}?", "chosen": f"{tag} answer {i}", "rejected": f"no {i}"} for i in range(n)]


def module(sources: list[dict], **kwargs) -> PreferenceDataModule:
    kwargs.setdefault("max_seq_len", 256)
    dm = PreferenceDataModule(sources, tokenizer_path=str(TOKENIZER), **kwargs)
    dm.setup()
    return dm


def side(tok: Tokenizer, prompt: list[dict], answer: str) -> list[int]:
    return encode_dialog(tok, [*prompt, {"role": "assistant", "content": answer}])[0]


def all_pairs(dm: PreferenceDataModule) -> list:
    return dm.train_dataset.pairs + dm.val_dataset.pairs


# ------------------------------------------------------------------------------------------ formats


def test_pairs_format_with_and_without_margin_labels(tmp_path: Path, tok: Tokenizer) -> None:
    system_dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5.", "margin_label": "significantly_better"},
        {"messages": system_dialog, "chosen": "Hello.", "rejected": "Go away.", "is_safety": True},
        {"prompt": "Name a colour.", "chosen": "Red.", "rejected": "Cheese.", "margin_label": None},
    ])
    dm = module([{"path": str(path), "is_safety": False}], val_fraction=0.3)
    pairs = {p.line: p for p in all_pairs(dm)}
    assert sorted(pairs) == [1, 2, 3]
    assert [pairs[i].margin_label for i in (1, 2, 3)] == ["significantly_better", None, None]
    assert [pairs[i].is_safety for i in (1, 2, 3)] == [False, True, False]  # record flag beats the source's
    assert pairs[1].chosen == side(tok, [{"role": "user", "content": "What is 2+2?"}], "4.")
    assert pairs[2].rejected == side(tok, system_dialog, "Go away.")
    for p in pairs.values():  # every side ends with the answer's EOS, where the score is read
        assert p.chosen[0] == tok.bos_id and p.chosen[-1] == tok.eos_id and p.rejected[-1] == tok.eos_id
    assert set(MARGIN_LABELS) == {"significantly_better", "better", "slightly_better", "negligibly_better"}


def test_identical_pairs_are_dropped_and_counted(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [
        *numbered_pairs(4, "a"),
        {"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."},
        {"prompt": "Same?", "chosen": " Yes. ", "rejected": "Yes."},  # equal once the chat format strips it
    ])
    dm = module([{"path": str(path)}], val_fraction=0.25)
    assert dm.stats["identical"] == 2 and dm.stats["sources"][0]["identical_lines"] == [5, 6]
    assert len(all_pairs(dm)) == 4


def test_hh_adapter_on_the_shipped_files(shared_data: Path, tok: Tokenizer) -> None:
    helpful = shared_data / "hh_helpful_pairs.jsonl.gz"
    dm = module([{"path": str(helpful), "format": "hh"}], max_seq_len=256, val_fraction=0.05)
    st = dm.stats["sources"][0]
    assert st["records"] == 2000 and st["bad_lines"] == 0
    assert st["identical"] >= 1 and 722 in st["identical_lines"]  # chosen == rejected in the data
    assert st["pairs"] == st["records"] - st["identical"] - st["too_long"]
    assert st["truncated"] > 0 and st["too_long"] > 0  # HH dialogs are long for 256 tokens of this vocab
    assert st["train"] + st["val"] == st["pairs"] and st["val"] == round(0.05 * st["pairs"])
    for p in all_pairs(dm):
        assert p.chosen != p.rejected and p.margin_label is None and p.is_safety is False
        for ids in (p.chosen, p.rejected):
            assert len(ids) <= 256 and ids[0] == tok.bos_id and ids[-1] == tok.eos_id

    # The first kept record against the raw text: the score token follows the chosen reply.
    pair = min(all_pairs(dm), key=lambda p: p.line)
    with gzip.open(helpful, "rt") as f:
        record = json.loads(f.readlines()[pair.line - 1])
    for ids, dialog in ((pair.chosen, record["chosen"]), (pair.rejected, record["rejected"])):
        reply = dialog.rsplit("\n\nAssistant:", 1)[1].strip()
        assert tok.decode(ids).rstrip().endswith(f"[/INST] {reply}")


def test_truncation_keeps_the_last_turn_and_the_same_context_on_both_sides(tmp_path: Path, tok: Tokenizer) -> None:
    history = [{"role": "user", "content": f"Tell me fact number {i} about llamas, at length."} for i in range(6)]
    for i in range(6):
        history.insert(2 * i + 1, {"role": "assistant", "content": f"Llama fact {i}: they hum when content."})
    prompt = [*history, {"role": "user", "content": "And the last one?"}]
    record = {"messages": prompt, "chosen": "They spit when annoyed.", "rejected": "No."}
    path = write_jsonl(tmp_path / "p.jsonl", [record, *numbered_pairs(3, "x")])
    full_c, full_r = side(tok, prompt, record["chosen"]), side(tok, prompt, record["rejected"])
    max_len = len(full_c) - 20
    dm = module([{"path": str(path)}], max_seq_len=max_len, val_fraction=0.25)
    pair = next(p for p in all_pairs(dm) if p.line == 1)
    assert dm.stats["truncated"] == 1 and len(pair.chosen) == max_len
    assert pair.chosen[0] == tok.bos_id and pair.rejected[0] == tok.bos_id
    assert pair.chosen[1:] == full_c[21:] and pair.rejected[1:] == full_r[21:]  # same 21 oldest tokens cut
    last_turn = side(tok, prompt[-1:], record["chosen"])
    assert pair.chosen[-len(last_turn):] == last_turn


def test_truncate_pair_rules() -> None:
    BOS, EOS = 1, 2
    chosen = [BOS, 10, 11, 12, EOS, BOS, 20, 21, 22, EOS]  # two turns; the last starts at index 5
    rejected = [BOS, 10, 11, 12, EOS, BOS, 20, 21, EOS]
    assert truncate_pair(chosen, rejected, 10, BOS) == (chosen, rejected)  # fits: unchanged
    assert truncate_pair(chosen, rejected, 8, BOS) == ([BOS, 12, EOS, *chosen[5:]], [BOS, 12, EOS, *rejected[5:]])
    assert truncate_pair(chosen, rejected, 5, BOS) == (chosen[5:], rejected[5:])  # exactly the last turn
    assert truncate_pair(chosen, rejected, 4, BOS) is None  # the last turn itself does not fit


def test_too_long_pairs_are_dropped_and_counted(tmp_path: Path) -> None:
    long = {"prompt": "Tell me everything. " * 40, "chosen": "Fine.", "rejected": "No."}
    path = write_jsonl(tmp_path / "p.jsonl", [*numbered_pairs(4, "a"), long])
    dm = module([{"path": str(path)}], max_seq_len=64, val_fraction=0.25)
    assert dm.stats["too_long"] == 1 and len(all_pairs(dm)) == 4


# ------------------------------------------------------------------------------------ split, mixing


def test_held_out_split_is_disjoint_deterministic_and_keeps_duplicates_together(tmp_path: Path) -> None:
    records = numbered_pairs(40, "a")
    records += [records[3], records[3], records[7]]  # duplicates must not straddle the split
    path = write_jsonl(tmp_path / "a.jsonl", records)
    dm = module([{"path": str(path)}], val_fraction=0.25, seed=1)
    train = {p.key for p in dm.train_dataset.pairs}
    val = {p.key for p in dm.heldout_dataset.pairs}
    assert not train & val
    assert len(train) + len(val) == 40 and len(val) == 10
    assert len(dm.train_dataset) + len(dm.val_dataset) == 43
    again = module([{"path": str(path)}], val_fraction=0.25, seed=1)
    assert [p.line for p in again.val_dataset.pairs] == [p.line for p in dm.val_dataset.pairs]
    other = module([{"path": str(path)}], val_fraction=0.25, seed=2)
    assert {p.key for p in other.val_dataset.pairs} != val


def test_held_out_pairs_depend_on_content_not_on_source_order(tmp_path: Path) -> None:
    # The helpfulness and safety configs list the same files in opposite orders: both must hold out
    # the same pairs, or cross-evaluating one RM on the other's held-out set scores training pairs.
    a = write_jsonl(tmp_path / "a.jsonl", numbered_pairs(30, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", numbered_pairs(30, "b"))
    ab = module([{"path": str(a)}, {"path": str(b)}], val_fraction=0.2, seed=5)
    ba = module([{"path": str(b)}, {"path": str(a)}], val_fraction=0.2, seed=5)
    val_ab, val_ba = {p.key for p in ab.val_dataset.pairs}, {p.key for p in ba.val_dataset.pairs}
    assert val_ab == val_ba and len(val_ab) == 12
    assert not val_ab & {p.key for p in ba.train_dataset.pairs}
    # a smaller share holds out a subset of a larger one (same seed)
    small = module([{"path": str(a)}, {"path": str(b)}], val_fraction=0.1, seed=5)
    assert {p.key for p in small.val_dataset.pairs} < val_ab


def test_val_sources_are_held_out_and_removed_from_training(tmp_path: Path) -> None:
    records = numbered_pairs(20, "a")
    train_path = write_jsonl(tmp_path / "train.jsonl", records)
    val_path = write_jsonl(tmp_path / "test.jsonl", [records[0], records[1], *numbered_pairs(3, "t")], gz=True)
    dm = module([{"path": str(train_path)}], val_sources=[{"path": str(val_path), "name": "test"}], val_fraction=0.0)
    assert dm.source_names == ["train", "test"]
    assert len(dm.val_dataset) == 5 and {p.source for p in dm.val_dataset.pairs} == {1}
    assert len(dm.train_dataset) == 18 and dm.stats["train_overlapping_val"] == 2
    assert not {p.key for p in dm.train_dataset.pairs} & {p.key for p in dm.val_dataset.pairs}


def test_mixture_counts_semantics() -> None:
    assert mixture_counts([90, 500], [0.9, 0.1]) == [90, 10]  # safety RM: 90 / 10
    assert mixture_counts([100, 80, 300], [0.5, 0.25, 0.25]) == [100, 50, 50]  # helpfulness RM
    assert mixture_counts([100, 80, 300], [None, None, 0.0]) == [100, 80, 0]  # whole, whole, val only
    with pytest.raises(ValueError, match=r"sources\[0\].weight must be > 0"):
        mixture_counts([10, 10], [0.0, 1.0])
    # beside whole sources a weight is a fraction of the whole mixture: 90 + 45 whole = 90% of 150
    assert mixture_counts([90, 45, 500, 7], [None, None, 0.05, 0.05]) == [90, 45, 8, 8]  # 7.5 rounds to 8
    with pytest.raises(ValueError, match=r"weights summing to 1, .*must sum to less than 1"):
        mixture_counts([90, 45, 10], [0.9, None, 0.1])


@pytest.mark.parametrize("config", ["llama2-7b-safety", "llama2-70b-safety", "tiny-safety"])
def test_safety_configs_mix_90_10_of_the_total(config: str, tmp_path: Path) -> None:
    """The paper's safety RM data: Meta Safety + Anthropic Harmless 90%, helpfulness 10% of all pairs,
    with the config's own sources and weights over files of uneven sizes."""
    import yaml
    from paths import ROOT

    sources = yaml.safe_load((ROOT / "configs/reward" / f"{config}.yaml").read_text())["data"]["init_args"]["sources"]
    sizes = [400, 230, 300, 350][: len(sources)]
    local = []
    for i, (src, n) in enumerate(zip(sources, sizes)):
        path = write_jsonl(tmp_path / f"s{i}.jsonl", numbered_pairs(n, f"s{i}"))
        local.append({**src, "path": str(path), "format": "pairs"})
    dm = module(local, val_fraction=0.05, seed=0)
    n_safety = sum(bool(p.is_safety) for p in dm.train_dataset.pairs)
    total = len(dm.train_dataset)
    weighted = sum(1 for s in sources if s.get("weight") is not None)
    # each weighted source's count is rounded once: at most half a pair each away from the exact mix
    assert abs(n_safety / total - 0.9) <= (0.5 * weighted + 1) / total, (n_safety, total)


def test_mixing_weights_give_the_expected_proportions_deterministically(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", numbered_pairs(100, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", numbered_pairs(40, "b"))
    c = write_jsonl(tmp_path / "c.jsonl", numbered_pairs(10, "c"))
    sources = [{"path": str(a), "weight": 0.9, "is_safety": True}, {"path": str(b), "weight": 0.1},
               {"path": str(c), "weight": 0.2}]
    dm = module(sources, val_fraction=0.1, seed=3)
    counts = Counter(p.source for p in dm.train_dataset.pairs)
    # 90 training pairs of the primary; b: 90 * 0.1 / 0.9 = 10 of its 36; c: 20 from 9 (upsampled).
    assert counts == {0: 90, 1: 10, 2: 20}
    assert [s["train_sampled"] for s in dm.stats["sources"]] == [90, 10, 20]
    b_lines = [p.line for p in dm.train_dataset.pairs if p.source == 1]
    assert len(set(b_lines)) == 10  # a subsample is drawn without replacement
    c_uses = Counter(p.line for p in dm.train_dataset.pairs if p.source == 2)
    assert len(c_uses) == 9 and set(c_uses.values()) == {2, 3}  # whole repeats plus a seeded remainder
    assert all(p.is_safety == (p.source == 0) for p in dm.train_dataset.pairs)

    same = module(sources, val_fraction=0.1, seed=3)
    order = [(p.source, p.line) for p in dm.train_dataset.pairs]
    assert [(p.source, p.line) for p in same.train_dataset.pairs] == order
    other = module(sources, val_fraction=0.1, seed=4)
    assert Counter(p.source for p in other.train_dataset.pairs) == counts
    assert [p.line for p in other.train_dataset.pairs if p.source == 1] != b_lines


def test_safety_mix_on_the_shipped_files(shared_data: Path) -> None:
    sources = [
        {"path": str(shared_data / "hh_harmless_pairs.jsonl.gz"), "format": "hh", "is_safety": True,
         "weight": 0.9, "limit": 300},
        {"path": str(shared_data / "hh_helpful_pairs.jsonl.gz"), "format": "hh", "weight": 0.1, "limit": 300},
    ]
    dm = module(sources, max_seq_len=512, val_fraction=0.1)
    n_safety = sum(p.is_safety for p in dm.train_dataset.pairs)
    n_helpful = len(dm.train_dataset) - n_safety
    assert n_helpful == round(n_safety / 9)
    assert [s["records"] for s in dm.stats["sources"]] == [300, 300]


# ------------------------------------------------------------------------------------------- batches


def test_collate_layout_chosen_rows_first_then_rejected(tmp_path: Path, tok: Tokenizer) -> None:
    records = numbered_pairs(6, "a")
    records[0]["margin_label"] = "better"
    records[1]["chosen"] = "A much longer chosen answer that pads every other row."
    path = write_jsonl(tmp_path / "p.jsonl", records)
    dm = module([{"path": str(path), "is_safety": True}], batch_size=3, val_fraction=0.2)
    pairs = dm.train_dataset.pairs[:3]
    batch = collate_preference_pairs([dm.train_dataset[i] for i in range(3)], pad_id=tok.pad_id)
    B = 3
    ids, mask, lengths = batch["input_ids"], batch["attention_mask"], batch["lengths"]
    assert ids.shape == mask.shape == (2 * B, max(max(len(p.chosen), len(p.rejected)) for p in pairs))
    assert mask.dtype == torch.bool and ids.dtype == torch.long
    for i, p in enumerate(pairs):
        for row, seq in ((i, p.chosen), (B + i, p.rejected)):
            assert lengths[row] == len(seq) == mask[row].sum()
            assert ids[row, : len(seq)].tolist() == seq
            assert mask[row, : len(seq)].all() and not mask[row, len(seq):].any()  # right padding
            assert (ids[row, len(seq):] == tok.pad_id).all()
    assert batch["margin_label"] == [p.margin_label for p in pairs]
    assert batch["is_safety"].tolist() == [True] * 3 and batch["source"].tolist() == [0, 0, 0]

    loader_batch = next(iter(dm.train_dataloader()))
    assert loader_batch["input_ids"].shape[0] == 2 * 3 and loader_batch["is_safety"].shape == (3,)
    assert next(iter(dm.val_dataloader()))["input_ids"].shape[0] == 2 * len(dm.val_dataset)


def test_reward_model_scores_a_collated_batch_like_single_sequences(tmp_path: Path) -> None:
    records = numbered_pairs(5, "a")
    records[2]["rejected"] = "a rejected answer long enough to force padding on the others"
    dm = module([{"path": str(write_jsonl(tmp_path / "p.jsonl", records))}], batch_size=4, val_fraction=0.2)
    batch = next(iter(dm.train_dataloader()))
    assert not batch["attention_mask"].all()  # some rows are padded
    torch.manual_seed(0)
    model = ScalarModel.from_config(LlamaConfig.from_name("tiny")).eval()
    with torch.no_grad():
        scores = model(batch["input_ids"], batch["attention_mask"])  # (2B,)
        alone = [model(row[:n][None])[0] for row, n in zip(batch["input_ids"], batch["lengths"])]
    torch.testing.assert_close(scores, torch.stack(alone), atol=1e-5, rtol=0)
    chosen, rejected = scores.chunk(2)
    assert chosen.shape == rejected.shape == (4,)


# -------------------------------------------------------------------------------------- bad lines


def bad_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "bad.jsonl", [
        *numbered_pairs(2, "a"),
        "{not json",
        {"prompt": "Q?", "chosen": "A."},  # no rejected
        {"prompt": "Q?", "chosen": "A.", "rejected": "B.", "margin_label": "much_better"},
        {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: bye\n\nAssistant: b"},
        *numbered_pairs(3, "b"),
    ])


def test_bad_line_error_names_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON"):
        module([{"path": str(bad_file(tmp_path))}])
    path = write_jsonl(tmp_path / "schema.jsonl", [*numbered_pairs(1, "a"), {"chosen": "A.", "rejected": "B."}])
    with pytest.raises(ValueError, match=r"schema\.jsonl:2: expected exactly one of 'prompt'"):
        module([{"path": str(path)}])


def test_bad_margin_label_and_hh_mismatch_errors(tmp_path: Path) -> None:
    record = {"prompt": "Q?", "chosen": "A.", "rejected": "B.", "margin_label": "much"}
    path = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: 'margin_label' is 'much'; allowed: significantly_better"):
        module([{"path": str(path)}])
    hh = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: hi\n\nAssistant: a",
                                             "rejected": "\n\nHuman: bye\n\nAssistant: b"}], gz=True)
    with pytest.raises(ValueError, match=r"hh\.jsonl:1: HH chosen and rejected dialogs differ"):
        module([{"path": str(hh), "format": "hh"}])


def test_skip_counts_bad_lines(tmp_path: Path) -> None:
    dm = module([{"path": str(bad_file(tmp_path))}], on_bad_line="skip", val_fraction=0.2)
    st = dm.stats["sources"][0]
    # Line 3 is unreadable JSON; 4 lacks 'rejected'; 5 has an unknown label; 6 is HH in a pairs file.
    assert st["bad_lines"] == dm.stats["bad_lines"] == 4 and st["bad_line_numbers"] == [3, 4, 5, 6]
    assert st["records"] == 8 and len(all_pairs(dm)) == 5


# ------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "sources, kwargs, match",
    [
        ([{"path": "x.jsonl", "fromat": "hh"}], {}, r"sources\[0\]: unknown key\(s\) \['fromat'\]; allowed keys"),
        ([{"path": "x.jsonl", "format": "csv"}], {}, r"sources\[0\].format is 'csv'; allowed: pairs, hh"),
        ([{"path": "x"}, {"path": "y", "weight": -1}], {}, r"sources\[1\].weight must be a number >= 0"),
        ([{"format": "hh"}], {}, r"sources\[0\].path is required"),
        ([], {}, "sources is empty"),
        ([{"path": "x"}], {"val_fraction": 0.0}, "no held-out data"),
        ([{"path": "x"}], {"on_bad_line": "ignore"}, "on_bad_line must be 'error' or 'skip'"),
    ],
)
def test_config_errors_name_the_key(sources: list, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PreferenceDataModule(sources, tokenizer_path=str(TOKENIZER), **kwargs)
