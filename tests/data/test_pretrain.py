"""PretrainDataModule: packing, caching, windows, splits, workers, ranks and exact mid-epoch resume."""

from __future__ import annotations

import gzip
import json
import random
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import sentencepiece as spm
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from llama2_lightning.data import PretrainDataModule
from llama2_lightning.data.pretrain import ResumableSampler, cache_key, resolve_files, token_dtype
from llama2_lightning.tokenizer import Tokenizer

WORDS = "the king queen sword crown night day river stone bread wine horse field tower ghost song".split()


def _document(rng: random.Random, n_words: int) -> str:
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n_words // 6)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A tiny model trained here keeps the tests independent of the shipped data/ files.
    out = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    lines = [_document(rng, 30) for _ in range(200)] + ["Ünïcödé 😀 ½"]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(out / "tok"),
        model_type="bpe",
        vocab_size=320,
        byte_fallback=True,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    return out / "tok.model"


@pytest.fixture(scope="module")
def tok(tokenizer_path: Path) -> Tokenizer:
    return Tokenizer(tokenizer_path)


def _write_corpus(folder: Path, n_docs: int = 3, n_words: int = 400, seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_docs):
        path = folder / f"doc{i}.txt"
        path.write_text(_document(rng, n_words), encoding="utf-8")
        paths.append(path)
    return paths


def _dm(files: list[Path] | list[str] | str, tokenizer_path: Path, cache: Path, **kwargs: object) -> PretrainDataModule:
    files = files if isinstance(files, str) else [str(f) for f in files]
    return PretrainDataModule(train_files=files, tokenizer_path=str(tokenizer_path), cache_dir=str(cache), **kwargs)


def _stream(dm: PretrainDataModule) -> np.ndarray:
    dm.prepare_data()
    dm.setup()
    return np.fromfile(dm.cache_path, dtype=dm.train_dataset.dtype)


# --------------------------------------------------------------------------------------- packing


def test_token_dtype_fits_vocabulary() -> None:
    assert token_dtype(2048) == np.uint16
    assert token_dtype(32_000) == np.uint16
    assert token_dtype(65_536) == np.uint16  # ids 0..65535 still fit
    assert token_dtype(65_537) == np.uint32
    assert token_dtype(128_256) == np.uint32
    with pytest.raises(ValueError):
        token_dtype(0)


def test_packing_is_documents_plus_eos(tmp_path: Path, tokenizer_path: Path, tok: Tokenizer) -> None:
    texts = _write_corpus(tmp_path / "in", n_docs=2)
    jsonl = tmp_path / "in" / "more.jsonl"
    records = ["first record", "second\nrecord with ½ and 😀", ""]
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(records)) + "\n\n")
    gz = tmp_path / "in" / "zipped.txt.gz"
    gz.write_bytes(gzip.compress("a gzipped document".encode()))
    dm = _dm([*texts, jsonl, gz], tokenizer_path, tmp_path / "cache", max_seq_len=8)

    stream = _stream(dm)
    docs = [p.read_text(encoding="utf-8") for p in texts] + records + ["a gzipped document"]
    expected = [i for d in docs for i in tok.encode(d) + [tok.eos_id]]
    assert stream.dtype == np.uint16
    np.testing.assert_array_equal(stream, np.array(expected))
    assert dm.num_tokens == len(expected)
    assert dm.bytes_per_token == pytest.approx(sum(len(d.encode("utf-8")) for d in docs) / len(expected))
    assert dm.vocab_size == tok.vocab_size == 320


def test_windows_cover_stream_once(tmp_path: Path, tokenizer_path: Path) -> None:
    files = _write_corpus(tmp_path / "in")
    for max_seq_len in (7, 32):
        dm = _dm(files, tokenizer_path, tmp_path / "cache", max_seq_len=max_seq_len)
        stream = torch.from_numpy(_stream(dm).astype(np.int64))
        windows = {}
        for ds in (dm.train_dataset, dm.val_dataset):
            for i in range(len(ds)):
                sample = ds[i]
                assert sample["input_ids"].dtype == sample["targets"].dtype == torch.long
                assert sample["input_ids"].shape == sample["targets"].shape == (max_seq_len,)
                torch.testing.assert_close(sample["input_ids"][1:], sample["targets"][:-1])
                windows[int(ds.windows[i])] = sample
        n = len(windows)
        assert sorted(windows) == list(range(n))  # train and val partition the windows
        # Every target position 1..n*L appears exactly once; what is left is a tail shorter than a window.
        targets = torch.cat([windows[w]["targets"] for w in range(n)])
        torch.testing.assert_close(targets, stream[1 : 1 + n * max_seq_len])
        assert 0 <= len(stream) - 1 - n * max_seq_len < max_seq_len
        torch.testing.assert_close(windows[0]["input_ids"][0], stream[0])


# ----------------------------------------------------------------------------------------- cache


def test_cache_hit_skips_tokenisation_and_change_retokenises(
    tmp_path: Path, tokenizer_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    backend = type(Tokenizer(tokenizer_path))  # the class whose encode_batch the data module calls
    original = backend.encode_batch

    def counting(self: Tokenizer, texts: list[str], **kwargs: bool) -> list[list[int]]:
        calls.append(len(texts))
        return original(self, texts, **kwargs)

    monkeypatch.setattr(backend, "encode_batch", counting)
    files = _write_corpus(tmp_path / "in")
    first = _stream(_dm(files, tokenizer_path, tmp_path / "cache", max_seq_len=8))
    assert calls
    calls.clear()

    # A fresh module (a second run) with the same inputs reuses the file ...
    again = _dm(files, tokenizer_path, tmp_path / "cache", max_seq_len=16)
    np.testing.assert_array_equal(_stream(again), first)
    # ... also when the same contents sit under other paths: the key is the content.
    moved = [shutil.copy(f, tmp_path / f"copy{i}.txt") for i, f in enumerate(files)]
    np.testing.assert_array_equal(_stream(_dm(moved, tokenizer_path, tmp_path / "cache")), first)
    assert calls == []

    files[1].write_text("an edited document\n", encoding="utf-8")
    edited = _dm(files, tokenizer_path, tmp_path / "cache", max_seq_len=8)
    changed = _stream(edited)
    assert calls  # tokenised again
    assert edited.cache_path != again.cache_path
    assert not np.array_equal(changed, first)
    assert len(list((tmp_path / "cache").glob("*.bin"))) == 2
    assert not list((tmp_path / "cache").glob(".*.tmp"))  # no temporary files left behind


def test_cache_key_depends_on_order_format_and_tokenizer(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.jsonl"
    a.write_text('{"text": "x"}\n')
    b.write_text('{"text": "x"}\n')
    base = cache_key([a, b], "tok1")
    assert cache_key([a, b], "tok1") == base
    assert cache_key([b, a], "tok1") != base  # order changes the stream
    assert cache_key([a, a], "tok1") != base  # same bytes, parsed as text rather than JSONL
    assert cache_key([a, b], "tok2") != base


# ---------------------------------------------------------------------------------------- errors


def _bad_input(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A broken input file and the message fragment that must name it."""
    path = tmp_path / ("bad.jsonl" if kind.startswith("jsonl") else "bad.txt")
    if kind == "missing":
        return path, f"not found: {path}"
    contents = {
        "empty": b"",
        "invalid_utf8": b"fine text then \xff\xfe broken",
        "jsonl_invalid_utf8": b'{"text": "ok"}\n{"text": "\xff"}\n',
        "jsonl_bad_json": b'{"text": "ok"}\n\n{"text": oops}\n',
        "jsonl_no_text": b'{"text": "ok"}\n{"body": "no text field"}\n',
        "jsonl_text_not_string": b'{"text": 3}\n',
        "jsonl_empty": b"\n  \n",
    }
    path.write_bytes(contents[kind])
    line = {"jsonl_invalid_utf8": 2, "jsonl_bad_json": 3, "jsonl_no_text": 2, "jsonl_text_not_string": 1}
    return path, f"{path}:{line[kind]}:" if kind in line else str(path)


@pytest.mark.parametrize(
    "kind",
    [
        "missing",
        "empty",
        "invalid_utf8",
        "jsonl_invalid_utf8",
        "jsonl_bad_json",
        "jsonl_no_text",
        "jsonl_text_not_string",
        "jsonl_empty",
    ],
)
def test_bad_input_error_names_file(tmp_path: Path, tokenizer_path: Path, kind: str) -> None:
    good = _write_corpus(tmp_path / "in", n_docs=1)
    bad, fragment = _bad_input(tmp_path, kind)
    dm = _dm([*good, bad], tokenizer_path, tmp_path / "cache")
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        dm.prepare_data()
    assert fragment in str(err.value)
    assert not list((tmp_path / "cache").glob("*.bin"))  # nothing half-written is cached


def test_glob_inputs(tmp_path: Path) -> None:
    files = _write_corpus(tmp_path / "in", n_docs=3)
    assert resolve_files(str(tmp_path / "in" / "doc*.txt")) == files  # sorted
    with pytest.raises(FileNotFoundError, match="nomatch"):
        resolve_files([str(files[0]), str(tmp_path / "nomatch*.txt")])


def test_bad_arguments_and_too_little_data(tmp_path: Path, tokenizer_path: Path) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        PretrainDataModule(val_fraction=0.0)
    with pytest.raises(ValueError, match="max_seq_len"):
        PretrainDataModule(max_seq_len=0)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("the king")
    dm = _dm([tiny], tokenizer_path, tmp_path / "cache", max_seq_len=64)
    with pytest.raises(ValueError, match="max_seq_len"):
        dm.setup()
    files = _write_corpus(tmp_path / "in", n_docs=1)
    dm = _dm(files, tokenizer_path, tmp_path / "cache", max_seq_len=8, batch_size=100_000)
    with pytest.raises(ValueError, match="batch_size"):
        dm.train_dataloader()


# ----------------------------------------------------------------------------- split and order


def test_split_is_deterministic_by_seed(tmp_path: Path, tokenizer_path: Path) -> None:
    files = _write_corpus(tmp_path / "in")

    def split(seed: int, fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
        dm = _dm(files, tokenizer_path, tmp_path / "cache", max_seq_len=8, seed=seed, val_fraction=fraction)
        dm.setup()
        return dm.train_dataset.windows, dm.val_dataset.windows

    train, val = split(1)
    np.testing.assert_array_equal(split(1)[1], val)
    assert not np.array_equal(split(2)[1], val)
    assert set(train).isdisjoint(val)
    assert len(val) == round(0.1 * (len(train) + len(val)))
    assert len(split(1, fraction=1e-9)[1]) == 1  # validation always gets a window


def test_rank_slices_disjoint_equal_and_covering() -> None:
    n, replicas = 103, 3
    dataset = range(n)
    slices = [list(ResumableSampler(dataset, replicas, rank, seed=5)) for rank in range(replicas)]
    assert {len(s) for s in slices} == {n // replicas}
    union = [i for s in slices for i in s]
    assert len(set(union)) == len(union) == n - n % replicas  # disjoint; only the remainder dropped
    # Same seed and epoch: same order on every call; next epoch: a different order.
    assert list(ResumableSampler(dataset, replicas, 0, seed=5)) == slices[0]
    later = ResumableSampler(dataset, replicas, 0, seed=5)
    later.set_epoch(1)
    assert list(later) != slices[0]


def test_sampler_resume_skips_only_its_epoch() -> None:
    sampler = ResumableSampler(range(40), 2, 1, seed=3)
    full = {e: list(_at_epoch(sampler, e)) for e in (0, 1)}
    sampler.resume(epoch=1, skip=7)
    assert len(sampler) == 20  # Lightning counts the skipped batches towards the epoch
    assert list(_at_epoch(sampler, 1)) == full[1][7:]
    assert list(_at_epoch(sampler, 0)) == full[0]


def _at_epoch(sampler: ResumableSampler, epoch: int) -> ResumableSampler:
    sampler.set_epoch(epoch)
    return sampler


def _batches(loader: torch.utils.data.DataLoader) -> list[torch.Tensor]:
    return [b["input_ids"] for b in loader]


def test_ranks_get_different_data(tmp_path: Path, tokenizer_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = _write_corpus(tmp_path / "in")
    windows = []
    for rank in range(2):
        # What a DDP / FSDP strategy reports: the data-parallel world size and this rank's place in it.
        kwargs = {"num_replicas": 2, "rank": rank}
        monkeypatch.setattr(L.Trainer, "distributed_sampler_kwargs", property(lambda self, kw=kwargs: kw))
        dm = _dm(files, tokenizer_path, tmp_path / "cache", max_seq_len=8, batch_size=4)
        dm.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
        loader = dm.train_dataloader()
        indices = list(loader.sampler)
        batches = torch.cat(_batches(loader))
        expected = torch.stack([dm.train_dataset[i]["input_ids"] for i in indices[: len(batches)]])
        torch.testing.assert_close(batches, expected)
        windows.append(set(dm.train_dataset.windows[indices].tolist()))
    assert len(windows[0]) == len(windows[1]) == len(dm.train_dataset) // 2
    assert windows[0].isdisjoint(windows[1])


def test_lightning_ddp_keeps_our_sampler(tmp_path: Path, tokenizer_path: Path) -> None:
    # Trainer construction does not launch processes; _prepare_dataloader is the step of fit() that
    # would swap in a DistributedSampler(Wrapper), i.e. shard our rank slice a second time.
    from lightning.pytorch.trainer.states import RunningStage

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False)
    dm = _dm(_write_corpus(tmp_path / "in"), tokenizer_path, tmp_path / "cache", max_seq_len=8, batch_size=4)
    dm.trainer = trainer
    loader = dm.train_dataloader()
    assert (loader.sampler.num_replicas, loader.sampler.rank) == (2, 0)
    assert trainer._data_connector._prepare_dataloader(loader, shuffle=True, mode=RunningStage.TRAINING) is loader


def test_lightning_cli_arguments() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(PretrainDataModule, "data")
    cfg = parser.parse_args(["--data.train_files=[a.txt, b.jsonl]", "--data.max_seq_len=8"])
    assert cfg.data.train_files == ["a.txt", "b.jsonl"] and cfg.data.max_seq_len == 8
    assert parser.parse_args(["--data.train_files=corpus/*.txt"]).data.train_files == "corpus/*.txt"
    assert parser.parse_args([]).data.cache_dir == "data/cache"


def test_two_workers_give_the_same_batches(tmp_path: Path, tokenizer_path: Path) -> None:
    files = _write_corpus(tmp_path / "in")
    loaders = {}
    for workers in (0, 2):
        dm = _dm(files, tokenizer_path, tmp_path / "cache", max_seq_len=8, batch_size=8, num_workers=workers)
        loaders[workers] = (dm.train_dataloader(), dm.val_dataloader())
    for zero, two in zip(loaders[0], loaders[2]):
        a, b = _batches(zero), _batches(two)
        assert len(a) == len(b) > 1
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y)


# ------------------------------------------------------------------------------ resume with Lightning


class RecordingModel(L.LightningModule):
    """A bigram model that records the batches it trains on."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab_size, 8)
        self.out = nn.Linear(8, vocab_size)
        self.seen: list[torch.Tensor] = []

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.out(self.emb(batch["input_ids"]))  # (B, T, vocab)
        return nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["input_ids"].clone())
        return self._loss(batch)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(
    dm: PretrainDataModule, max_steps: int, ckpt_path: Path | None = None, **trainer_kwargs: object
) -> tuple[RecordingModel, L.Trainer]:
    model = RecordingModel(dm.vocab_size)
    if not any(isinstance(c, ModelCheckpoint) for c in trainer_kwargs.get("callbacks", [])):
        trainer_kwargs["enable_checkpointing"] = False
    trainer = L.Trainer(
        default_root_dir=dm.cache_dir,  # anything Lightning writes stays in the test's tmp dir
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, trainer


STEPS = 10
BATCHES_PER_EPOCH = 4


class SaveAtHooks(L.Callback):
    """Checkpoints written where ModelCheckpoint can write them besides after a training step."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _save(self, trainer: L.Trainer, where: str) -> None:
        trainer.save_checkpoint(self.root / where / f"step={trainer.global_step}.ckpt")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._save(trainer, "val_end")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, "epoch_end")


TRAINER_KWARGS = {"val_check_interval": 2}  # validation mid-epoch too, in every run


@pytest.fixture(scope="module")
def resume_setup(tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path) -> dict[str, object]:
    """Run A: 10 steps over 2.5 epochs of 4 batches, checkpointing after every training step, at every
    validation end and at every training epoch end."""
    root = tmp_path_factory.mktemp("resume")
    files = _write_corpus(root / "in", n_docs=2, n_words=150)
    probe = _dm(files, tokenizer_path, root / "cache", max_seq_len=8)
    probe.setup()
    kwargs = {"max_seq_len": 8, "batch_size": len(probe.train_dataset) // BATCHES_PER_EPOCH, "num_workers": 2}

    def make(**overrides: object) -> PretrainDataModule:
        return _dm(files, tokenizer_path, root / "cache", **{**kwargs, **overrides})

    every_step = ModelCheckpoint(dirpath=root / "train_step", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    model, trainer = _fit(make(), STEPS, callbacks=[every_step, SaveAtHooks(root)], **TRAINER_KWARGS)
    assert trainer.num_training_batches == BATCHES_PER_EPOCH
    return {"make": make, "seen": model.seen, "root": root}


def _assert_same_batches(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_uninterrupted_run_reshuffles_each_epoch(resume_setup: dict) -> None:
    seen = resume_setup["seen"]
    assert len(seen) == STEPS
    epoch0, epoch1 = (torch.cat(seen[i : i + BATCHES_PER_EPOCH]) for i in (0, BATCHES_PER_EPOCH))
    assert not torch.equal(epoch0, epoch1)


@pytest.mark.parametrize(
    "saved_at, k",
    [
        ("train_step", 2),  # on_train_batch_end, mid epoch 0
        ("train_step", 4),  # on_train_batch_end of the last batch of epoch 0
        ("train_step", 7),  # mid epoch 1
        ("val_end", 6),  # on_validation_end, mid epoch 1
        ("epoch_end", 4),  # on_train_epoch_end
    ],
)
def test_resume_from_mid_training_checkpoint(resume_setup: dict, saved_at: str, k: int) -> None:
    ckpt = resume_setup["root"] / saved_at / f"step={k}.ckpt"
    state = torch.load(ckpt, weights_only=False)["PretrainDataModule"]
    assert (state["epoch"], state["batches_consumed"]) == divmod(k, BATCHES_PER_EPOCH)
    model, _ = _fit(resume_setup["make"](), STEPS, ckpt_path=ckpt, **TRAINER_KWARGS)
    _assert_same_batches(model.seen, resume_setup["seen"][k:])


class StopAfter(L.Callback):
    """A preempted job: save a checkpoint after training step ``k``, then stop."""

    def __init__(self, k: int, path: Path) -> None:
        self.k, self.path = k, path

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.k:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def test_resume_after_preempted_run(resume_setup: dict) -> None:
    """Run B saves after step k and stops; run C, with fresh objects, goes on from batch k."""
    make, k = resume_setup["make"], 5
    ckpt = resume_setup["root"] / "preempted.ckpt"
    model_b, _ = _fit(make(num_workers=0), STEPS, callbacks=[StopAfter(k, ckpt)], **TRAINER_KWARGS)
    _assert_same_batches(model_b.seen, resume_setup["seen"][:k])
    model_c, _ = _fit(make(num_workers=0), STEPS, ckpt_path=ckpt, **TRAINER_KWARGS)
    _assert_same_batches(model_c.seen, resume_setup["seen"][k:])


@pytest.mark.parametrize("k", [5, 2 * BATCHES_PER_EPOCH])
def test_resume_after_max_steps_stop(resume_setup: dict, k: int) -> None:
    """Extending a run that max_steps stopped: Lightning 2.6 books the interrupted epoch as finished
    and resumes the next one at the same batch_idx, yet the data goes on with the next unseen batch."""
    make = resume_setup["make"]
    dm = make()
    _, trainer = _fit(dm, k, **TRAINER_KWARGS)
    assert (dm.state_dict()["epoch"], dm.state_dict()["batches_consumed"]) == divmod(k, BATCHES_PER_EPOCH)
    ckpt = resume_setup["root"] / f"max_steps{k}.ckpt"
    trainer.save_checkpoint(ckpt)
    model, _ = _fit(make(), STEPS, ckpt_path=ckpt, **TRAINER_KWARGS)
    _assert_same_batches(model.seen, resume_setup["seen"][k:])


def test_limit_train_batches_starts_each_epoch_afresh(resume_setup: dict) -> None:
    # Lightning ends each epoch after 2 batches; the next epoch is a new permutation, not the rest of this one.
    model, _ = _fit(resume_setup["make"](num_workers=0), 4, limit_train_batches=2, **TRAINER_KWARGS)
    seen = resume_setup["seen"]
    _assert_same_batches(model.seen, seen[:2] + seen[BATCHES_PER_EPOCH : BATCHES_PER_EPOCH + 2])


def test_resume_with_other_batch_size_is_refused(resume_setup: dict) -> None:
    dm = resume_setup["make"](num_workers=0)
    dm.load_state_dict({**dm.state_dict(), "batch_size": dm.batch_size + 1, "batches_consumed": 1})
    with pytest.raises(ValueError, match="batch_size: checkpoint"):
        dm.train_dataloader()
