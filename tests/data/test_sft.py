"""SFTDataModule: answer-only labels, truncation, packing (with model parity), errors, adapters, split."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest
import torch

from paths import ROOT, TOKENIZER

from llama2_lightning.chat import B_INST, E_INST
from llama2_lightning.data.sft import (
    IGNORE_INDEX, ChatMarkers, SFTCollator, SFTDataModule, SFTSource, fit_to_length, pack_lengths,
    packed_attention_mask, read_source,
)
from llama2_lightning.model import Transformer
from llama2_lightning.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(TOKENIZER)


def _dialog(*turns: str, system: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    for k, content in enumerate(turns):
        messages.append({"role": "user" if k % 2 == 0 else "assistant", "content": content})
    return messages


def _write_jsonl(path: Path, rows: list[object | str]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _module(path: Path, **kwargs: object) -> SFTDataModule:
    kwargs.setdefault("val_fraction", 0.2)
    dm = SFTDataModule(sources=[{"path": str(path), "format": "messages"}], tokenizer_path=str(TOKENIZER), **kwargs)
    dm.setup()
    return dm


def _answer_runs(labels: torch.Tensor) -> list[list[int]]:
    """Contiguous runs of non-ignored labels, as token lists."""
    runs: list[list[int]] = []
    previous_kept = False
    for value in labels.tolist():
        if value != IGNORE_INDEX:
            if not previous_kept:
                runs.append([])
            runs[-1].append(value)
        previous_kept = value != IGNORE_INDEX
    return runs


def _sample_for(dm: SFTDataModule, index: int) -> dict[str, torch.Tensor]:
    """The unpacked sample of the index-th dialog (valid when nothing was dropped)."""
    for split, dataset in (("train", dm.train_dataset), ("val", dm.val_dataset)):
        where = dm.split_indices[split].tolist()
        if index in where:
            return dataset.samples[where.index(index)]
    raise KeyError(index)


def _all_samples(dm: SFTDataModule) -> list[dict[str, torch.Tensor]]:
    assert dm.train_dataset is not None and dm.val_dataset is not None
    return list(dm.train_dataset.samples) + list(dm.val_dataset.samples)


# ------------------------------------------------------------------------------------- labels


def test_labels_are_exactly_the_answers_and_their_eos(tmp_path: Path, tok: Tokenizer) -> None:
    dialogs = [
        _dialog("Who wrote Hamlet?", "William Shakespeare wrote it.", "When?", "Around 1600.", system="Be brief."),
        _dialog("Name a colour.", "Crimson."),
        _dialog("Say nothing else but yes.", "yes"),
        _dialog("Count to three.", "1, 2, 3", "And back?", "3, 2, 1"),
        _dialog("Greet me.", "  Hello there, friend!  "),
    ]
    path = _write_jsonl(tmp_path / "d.jsonl", [{"messages": d} for d in dialogs])
    dm = _module(path, max_seq_len=512)
    assert dm.stats["dialogs"] == 5 and dm.stats["kept"] == 5
    for index, d in enumerate(dialogs):
        sample = _sample_for(dm, index)
        ids, labels = sample["input_ids"], sample["labels"]
        assert ids.shape == labels.shape and ids.dtype == labels.dtype == torch.long
        # Shifted targets: every kept label is the next input token (or the final EOS).
        kept = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
        for t in kept[:-1]:
            assert labels[t] == ids[t + 1]
        runs = _answer_runs(labels)
        answers = [m["content"].strip() for m in d if m["role"] == "assistant"]
        assert len(runs) == len(answers)
        for run, answer in zip(runs, answers):
            assert run[-1] == tok.eos_id
            assert tok.decode(run[:-1]).strip() == answer
            # Nothing from the prompt leaked into the targets.
            assert E_INST not in tok.decode(run) and B_INST not in tok.decode(run)
        # Everything else (BOS, [INST] ... [/INST], system prompt) is ignored.
        ignored_text = tok.decode(ids[labels == IGNORE_INDEX])
        for m in d:
            if m["role"] != "assistant":
                assert m["content"] in ignored_text


# ---------------------------------------------------------------------------------- truncation


def _long_dialog() -> list[dict[str, str]]:
    return _dialog(
        "Tell me about the king of Denmark and his court at Elsinore.",
        "The king is Claudius, who took the throne after the old king died.",
        "And the ghost on the battlements at night?",
        "It is the old king, who walks because he was murdered.",
        "What does the ghost ask of his son, the young prince, when they speak at last?",
        "Revenge.",
    )


def test_left_truncation_drops_earlier_turns_then_prompt_text_never_the_answer(tok: Tokenizer) -> None:
    from llama2_lightning.chat import encode_dialog

    messages = _long_dialog()
    ids, mask = encode_dialog(tok, messages, add_generation_prompt=False)
    markers = ChatMarkers.from_tokenizer(tok)
    bos_positions = [i for i, t in enumerate(ids) if t == tok.bos_id]
    assert len(bos_positions) == 3
    last_turn = ids[bos_positions[-1] :]

    # Fits: unchanged.
    assert fit_to_length(ids, mask, len(ids) - 1, "left", markers)[2] == "kept"
    # One token short: the first turn goes as a whole, the sample starts at the next turn's BOS.
    out, out_mask, status = fit_to_length(ids, mask, len(ids) - 2, "left", markers)
    assert status == "truncated" and out == ids[bos_positions[1] :] and out_mask == mask[bos_positions[1] :]
    # Only the last turn fits: it is kept whole.
    out, _, status = fit_to_length(ids, mask, len(last_turn) - 1, "left", markers)
    assert status == "truncated" and out == last_turn
    # The last turn itself is too long: the start of its user text is cut, markers and answer stay.
    L = len(last_turn) - 6
    out, out_mask, status = fit_to_length(ids, mask, L, "left", markers)
    assert status == "truncated" and len(out) - 1 == L
    text = tok.decode(out)
    assert text.startswith(B_INST) and text.endswith(f"{E_INST} Revenge. ")
    assert "his son, the young prince" in text and "Tell me about" not in text
    assert tok.decode([t for t, m in zip(out, out_mask) if m]).strip() == "Revenge."
    assert out[-1] == tok.eos_id and out_mask[-1]
    # The answer alone (with its markers) cannot fit: dropped rather than cut.
    answer_len = sum(mask[bos_positions[-1] :])
    out, _, status = fit_to_length(ids, mask, answer_len + len(markers.close), "left", markers)
    assert status == "dropped" and out == []
    # drop mode drops anything too long.
    assert fit_to_length(ids, mask, len(ids) - 2, "drop", markers)[2] == "dropped"


def test_truncation_modes_are_counted_and_logged(tmp_path: Path, tok: Tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    short = [_dialog(f"Question {k}?", f"Answer {k}.") for k in range(6)]
    rows = [{"messages": d} for d in short] + [{"messages": _long_dialog()}, {"messages": _long_dialog()}]
    # The long dialogs' final answer is short, so left truncation can keep it; a dialog whose
    # final answer is itself too long must be dropped in both modes.
    rows.append({"messages": _dialog("Recite.", "word " * 200)})
    path = _write_jsonl(tmp_path / "d.jsonl", rows)

    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        left = _module(path, max_seq_len=48, truncation="left", val_fraction=0.3)
        left.setup("validate")  # a second setup must not rebuild or log again
    assert left.stats["truncated"] == 2 and left.stats["dropped"] == 1 and left.stats["kept"] == 6
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SFT data:")]
    assert len(summary) == 1 and "2 left-truncated, 1 dropped" in summary[0]
    for sample in _all_samples(left):
        assert len(sample["input_ids"]) <= 48
        assert (sample["labels"] != IGNORE_INDEX).any()

    drop = _module(path, max_seq_len=48, truncation="drop", val_fraction=0.3)
    assert drop.stats["truncated"] == 0 and drop.stats["dropped"] == 3 and drop.stats["kept"] == 6
    assert drop.stats["train_samples"] + drop.stats["val_samples"] == 6


# ------------------------------------------------------------------------------------- packing


def test_packed_attention_mask_by_hand() -> None:
    seg = torch.tensor([[1, 1, 2, 2, 2, 0]])
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    mask = packed_attention_mask(seg)
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], expected)


def test_pack_lengths_fills_rows_within_the_limit() -> None:
    lengths = [5, 3, 8, 2, 7, 1, 4, 6]
    rows = pack_lengths(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 4  # 36 tokens need at least 4 rows of 10
    assert pack_lengths(lengths, 10) == rows
    with pytest.raises(ValueError, match="max_seq_len=10"):
        pack_lengths([11], 10)


def _packing_data(tmp_path: Path) -> Path:
    dialogs = [_dialog(f"Question number {k} about the play?", "An answer " + "word " * (k % 5)) for k in range(12)]
    dialogs.append(_dialog("First?", "One.", "Second?", "Two."))
    return _write_jsonl(tmp_path / "d.jsonl", [{"messages": d} for d in dialogs])


def test_packing_segments_positions_and_contents(tmp_path: Path) -> None:
    path = _packing_data(tmp_path)
    plain = _module(path, max_seq_len=96, seed=3)
    packed = _module(path, max_seq_len=96, seed=3, packing=True)
    assert packed.stats["train_samples"] < plain.stats["train_samples"]  # several dialogs per row

    segments: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for name in ("train_dataset", "val_dataset"):
        for row in getattr(packed, name).samples:
            assert set(row) == {"input_ids", "labels", "position_ids", "segment_ids"}
            T = len(row["input_ids"])
            assert T <= 96 and all(len(v) == T for v in row.values())
            seg, pos = row["segment_ids"], row["position_ids"]
            k = int(seg.max())
            assert seg.tolist() == sorted(seg.tolist()) and set(seg.tolist()) == set(range(1, k + 1))
            for s in range(1, k + 1):
                where = (seg == s).nonzero().flatten()
                assert torch.equal(pos[where], torch.arange(len(where)))
                # The last position of a dialog predicts its own EOS, never the next dialog.
                assert row["labels"][where[-1]] == packed.tokenizer.eos_id
                segments.append((tuple(row["input_ids"][where].tolist()), tuple(row["labels"][where].tolist())))
    # Packing rearranges the same samples, per split.
    unpacked = [(tuple(s["input_ids"].tolist()), tuple(s["labels"].tolist())) for s in _all_samples(plain)]
    assert sorted(segments) == sorted(unpacked)
    val_segments = sum(int(r["segment_ids"].max()) for r in packed.val_dataset.samples)
    assert val_segments == len(plain.val_dataset)


def test_packed_row_matches_each_dialog_alone_through_the_model(tmp_path: Path) -> None:
    path = _packing_data(tmp_path)
    dm = _module(path, max_seq_len=96, packing=True, batch_size=4)
    torch.manual_seed(0)
    model = Transformer.from_name("tiny").eval()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] > 1 and int(batch["segment_ids"].max()) > 1
    assert (batch["segment_ids"] == 0).any()  # the collate padded at least one row
    with torch.no_grad():
        logits = model(
            batch["input_ids"], positions=batch["position_ids"], mask=packed_attention_mask(batch["segment_ids"])
        )  # (B, T, V)
        checked = 0
        for b in range(batch["input_ids"].shape[0]):
            for s in range(1, int(batch["segment_ids"][b].max()) + 1):
                where = (batch["segment_ids"][b] == s).nonzero().flatten()
                alone = model(batch["input_ids"][b, where][None])  # plain causal, positions from 0
                torch.testing.assert_close(logits[b, where], alone[0], atol=1e-5, rtol=1e-5)
                checked += 1
    assert checked >= 3


def test_padding_collate_shapes_and_causal_exactness(tmp_path: Path) -> None:
    path = _packing_data(tmp_path)
    dm = _module(path, max_seq_len=96, batch_size=5)
    samples = dm.train_dataset.samples[:5]
    batch = SFTCollator(dm.tokenizer.pad_id)(samples)
    T = max(len(s["input_ids"]) for s in samples)
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].shape == batch["labels"].shape == (5, T)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        assert torch.equal(batch["input_ids"][b, :n], s["input_ids"]) and torch.equal(batch["labels"][b, :n], s["labels"])
        assert (batch["input_ids"][b, n:] == dm.tokenizer.pad_id).all() and (batch["labels"][b, n:] == IGNORE_INDEX).all()
    # Right padding + causal attention: real positions are unaffected by the pads.
    torch.manual_seed(0)
    model = Transformer.from_name("tiny").eval()
    with torch.no_grad():
        logits = model(batch["input_ids"])
        for b, s in enumerate(samples):
            n = len(s["input_ids"])
            torch.testing.assert_close(logits[b, :n], model(s["input_ids"][None])[0], atol=1e-5, rtol=1e-5)
    loader_batch = next(iter(dm.train_dataloader()))
    assert loader_batch["input_ids"].shape[0] == 5 and loader_batch["input_ids"].dtype == torch.long


# ------------------------------------------------------------------------------ malformed lines


def test_malformed_lines_name_file_and_line_or_are_skipped_and_counted(tmp_path: Path) -> None:
    good = {"messages": _dialog("Hi?", "Hello.")}
    rows: list[object | str] = [good, good, '{"messages": [oops', good, {"messages": _dialog("Only a question?")}, good, good]
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=rf"{path}:3: malformed JSON"):
        _module(path)
    # A well-formed JSON line the chat format rejects (no final answer) also names its line.
    fixed = _write_jsonl(tmp_path / "bad2.jsonl", [good, good, {"messages": _dialog("Only a question?")}, good])
    with pytest.raises(ValueError, match=rf"{fixed}:3: .*end with an assistant message"):
        _module(fixed)
    wrong_shape = _write_jsonl(tmp_path / "bad3.jsonl", [good, {"text": "not a dialog"}])
    with pytest.raises(ValueError, match=rf"{wrong_shape}:2: expected an object with a 'messages' list"):
        _module(wrong_shape)

    dm = _module(path, on_bad_line="skip")
    assert dm.stats["skipped_lines"] == 2 and dm.stats["dialogs"] == 5


# ------------------------------------------------------------------------------------ adapters


def test_self_instruct_adapter_on_the_shipped_copy(tok: Tokenizer) -> None:
    path = ROOT / "data" / "sft" / "self_instruct_seed_tasks.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    dialogs, skipped = read_source(SFTSource(str(path), "self_instruct"), tokenizer=tok)
    assert skipped == 0 and len(dialogs) == sum(len(r["instances"]) for r in records) == 175
    with_input = next(k for k, r in enumerate(records) if r["instances"][0]["input"].strip())
    record, dialog = records[with_input], dialogs[with_input].messages
    assert [m["role"] for m in dialog] == ["user", "assistant"]
    assert dialog[0]["content"].startswith(record["instruction"].strip())
    assert dialog[0]["content"].endswith(record["instances"][0]["input"].strip())
    assert dialog[1]["content"] == record["instances"][0]["output"].strip()
    assert dialogs[with_input].origin == f"{path}:{with_input + 1}"
    limited, _ = read_source(SFTSource(str(path), "self_instruct", limit=10))
    assert [d.messages for d in limited] == [d.messages for d in dialogs[:10]]


def test_hh_chosen_adapter_on_the_shared_pairs(shared_data: Path) -> None:
    # Chosen dialogs with an empty turn (an empty reply was rated) are left out of SFT and counted.
    for name, empty in (("hh_helpful_pairs.jsonl.gz", 1), ("hh_harmless_pairs.jsonl.gz", 4)):
        path = shared_data / name
        with gzip.open(path, "rt", encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        counts: dict[str, int] = {}
        dialogs, skipped = read_source(SFTSource(str(path), "hh_chosen"), counts=counts)
        assert skipped == 0 and counts == {"empty": empty} and len(dialogs) + empty == len(records) == 2000
        for dialog in dialogs[:50]:
            record = records[int(dialog.origin.rsplit(":", 1)[1]) - 1]
            roles = [m["role"] for m in dialog.messages]
            assert roles[0] == "user" and roles[-1] == "assistant"
            assert all(a != b for a, b in zip(roles, roles[1:]))
            # The answer trained on is the chosen side's final Assistant turn.
            assert dialog.messages[-1]["content"] == record["chosen"].rsplit("\n\nAssistant:", 1)[1].strip()
            assert dialog.messages[0]["content"] == record["chosen"].split("\n\nHuman:")[1].split("\n\nAssistant:")[0].strip()
    assert len(read_source(SFTSource(str(path), "hh_chosen", limit=7))[0]) == 7


def test_default_module_uses_only_project_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    dm = SFTDataModule()
    dm.setup()
    assert dm.stats["dialogs"] == 175 and dm.stats["skipped_lines"] == 0
    assert dm.hparams["sources"] == [{"path": "data/sft/self_instruct_seed_tasks.jsonl", "format": "self_instruct", "limit": None}]
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == dm.batch_size and batch["input_ids"].shape[1] <= dm.max_seq_len


def test_sources_parse_from_yaml_and_bad_values_name_the_key(tmp_path: Path) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(SFTDataModule, "data")
    cfg = parser.parse_string(
        "data:\n"
        "  sources:\n"
        "    - {path: data/sft/self_instruct_seed_tasks.jsonl, format: self_instruct}\n"
        "    - {path: ../shared/data/hh_helpful_pairs.jsonl.gz, format: hh_chosen, limit: 100}\n"
        "  packing: true\n"
    )
    dm = parser.instantiate(cfg).data
    assert dm.sources == [
        SFTSource("data/sft/self_instruct_seed_tasks.jsonl", "self_instruct"),
        SFTSource("../shared/data/hh_helpful_pairs.jsonl.gz", "hh_chosen", 100),
    ]
    assert dm.packing is True
    with pytest.raises(Exception, match="format"):
        parser.parse_string("data:\n  sources:\n    - {path: x.jsonl, format: bogus}\n")
    with pytest.raises(ValueError, match="'bogus' is not one of"):
        SFTDataModule(sources=[{"path": "x.jsonl", "format": "bogus"}])


# --------------------------------------------------------------------------------------- split


def test_split_is_deterministic_by_seed_and_keeps_whole_dialogs(tmp_path: Path) -> None:
    dialogs = [_dialog(f"Question {k}?", "Answer " + "ok " * (k % 40), "More?", "Done.") for k in range(40)]
    path = _write_jsonl(tmp_path / "d.jsonl", [{"messages": d} for d in dialogs])
    a, b = _module(path, seed=1, val_fraction=0.25), _module(path, seed=1, val_fraction=0.25)
    other = _module(path, seed=2, val_fraction=0.25)
    shorter = _module(path, seed=1, val_fraction=0.25, max_seq_len=80, truncation="drop")
    assert 0 < shorter.stats["dropped"] < 40

    train, val = set(a.split_indices["train"].tolist()), set(a.split_indices["val"].tolist())
    assert not train & val and train | val == set(range(40)) and len(val) == 10
    assert set(b.split_indices["val"].tolist()) == val
    assert set(shorter.split_indices["val"].tolist()) == val  # length filtering never moves a dialog
    assert set(other.split_indices["val"].tolist()) != val
    for x, y in zip(a.val_dataset.samples, b.val_dataset.samples, strict=True):
        assert torch.equal(x["input_ids"], y["input_ids"])
    # Multi-turn dialogs are never split across train and val: each sample has both of its answers.
    assert all(len(_answer_runs(s["labels"])) == 2 for s in _all_samples(a))
    # Training order depends on the seed only.
    torch.manual_seed(123)
    first_a = next(iter(a.train_dataloader()))["input_ids"]
    torch.manual_seed(456)
    first_b = next(iter(b.train_dataloader()))["input_ids"]
    assert torch.equal(first_a, first_b)


def test_train_turns_limit_the_loss_to_flagged_answers(tmp_path) -> None:
    """Ghost Attention files (``llama2-lightning gatt``) flag only the last answer for training."""
    import json

    from llama2_lightning.data.sft import SFTSource, read_source
    from llama2_lightning.tokenizer import Tokenizer

    tok = Tokenizer(Path(__file__).resolve().parents[2] / "data" / "tokenizer.model")
    messages = [{"role": "system", "content": "Speak like a pirate."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Ahoy"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Farewell"}]
    path = tmp_path / "gatt.jsonl"
    path.write_text(json.dumps({"messages": messages, "train_turns": [False, False, False, False, True]}) + "\n"
                    + json.dumps({"messages": messages, "train_turns": "yes"}) + "\n")
    with pytest.raises(ValueError, match=r"gatt\.jsonl:2: 'train_turns' must be a list of booleans"):
        read_source(SFTSource(str(path)), tokenizer=tok)
    dialogs, skipped = read_source(SFTSource(str(path)), on_bad_line="skip", tokenizer=tok)
    assert skipped == 1
    trained = [i for i, m in zip(dialogs[0].ids, dialogs[0].mask) if m]
    assert tok.decode(trained).strip() == "Farewell"
