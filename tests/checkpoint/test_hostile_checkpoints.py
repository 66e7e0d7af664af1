"""A crafted sharded-checkpoint directory never runs code: on every path that reads a directory the
hostile `.metadata` (which, unpickled by torch's own reader, creates a file) is refused with an
error naming it, and the file is never created. Plus the unreadable-file errors and the refusal
text for single-file pickles."""

from __future__ import annotations

import os
import pickle
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

from llama2_lightning.checkpoint import load_checkpoint, read_config
from llama2_lightning.config import LlamaConfig
from llama2_lightning.checkpoint.safe_load import (
    CheckpointReadError, UnsafeCheckpointError, read_dcp_metadata, safe_dcp_loading,
)

from crafted_checkpoints import make_hostile, sharded_lm, sharded_rm

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "data" / "tokenizer.model"
REFUSED = "refused to load"


@pytest.fixture(scope="module")
def config() -> LlamaConfig:
    return LlamaConfig.from_name("tiny")


@pytest.fixture
def hostile_lm(tmp_path: Path, config: LlamaConfig) -> tuple[Path, Path]:
    marker = tmp_path / "CODE_RAN"
    return make_hostile(sharded_lm(tmp_path / "lm.ckpt", config), marker), marker


@pytest.fixture
def hostile_rm(tmp_path: Path, config: LlamaConfig) -> tuple[Path, Path]:
    marker = tmp_path / "CODE_RAN"
    return make_hostile(sharded_rm(tmp_path / "rm.ckpt", config), marker), marker


def _command(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from llama2_lightning.cli import main

    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse's parser.exit / parser.error
        rc = exit_.code if isinstance(exit_.code, int) else 1
    return rc, capsys.readouterr().err


def test_the_crafted_directory_runs_code_under_torchs_own_reader(hostile_lm: tuple[Path, Path]) -> None:
    """The fixture is really hostile: plain pickle.load of its .metadata (what torch does) creates the file."""
    directory, marker = hostile_lm
    pickle.loads((directory / ".metadata").read_bytes())
    assert marker.exists()


def test_safe_reader_reads_a_real_sharded_checkpoint(tmp_path: Path, config: LlamaConfig) -> None:
    directory = sharded_lm(tmp_path / "ok.ckpt", config)
    read_dcp_metadata(directory)
    loaded_config, state_dict = load_checkpoint(directory)
    assert loaded_config == config
    torch.manual_seed(0)
    from llama2_lightning.model import Transformer

    expected = Transformer(config).state_dict()
    assert set(state_dict) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(state_dict[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("command", ["convert", "generate", "chat"])
def test_language_model_commands_refuse(command: str, hostile_lm: tuple[Path, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    directory, marker = hostile_lm
    argv = {
        "convert": ["convert", "--from", "lightning", "--to", "hf", str(directory), str(tmp_path / "out")],
        "generate": ["generate", "--checkpoint", str(directory), "--tokenizer", str(TOKENIZER), "--prompt", "hi"],
        "chat": ["chat", "--checkpoint", str(directory), "--tokenizer", str(TOKENIZER), "--device", "cpu"],
    }[command]
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    rc, err = _command(argv, capsys)
    assert rc != 0 and REFUSED in err and str(directory) in err
    assert not marker.exists()


@pytest.mark.parametrize("command", ["score", "score-pairs", "export-rm"])
def test_reward_model_commands_refuse(command: str, hostile_rm: tuple[Path, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    directory, marker = hostile_rm
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    argv = {
        "score": ["score", "--checkpoint", str(directory), "--tokenizer", str(TOKENIZER), "--prompt", "q",
                  "--answer", "a"],
        "score-pairs": ["score-pairs", "--checkpoint", str(directory), "--tokenizer", str(TOKENIZER), str(pairs)],
        "export-rm": ["export-rm", str(directory), str(tmp_path / "out"), "--tokenizer", str(TOKENIZER)],
    }[command]
    rc, err = _command(argv, capsys)
    assert rc != 0 and REFUSED in err
    assert not marker.exists()


def test_init_from_refuses(hostile_lm: tuple[Path, Path], config: LlamaConfig) -> None:
    """Both halves of `--model.init_args.init_from DIR`: the config read (modules with model: null) and
    the weights loaded in configure_model."""
    from llama2_lightning.model import Transformer
    from llama2_lightning.modules.common import build_config, load_initial_weights

    directory, marker = hostile_lm
    with pytest.raises(UnsafeCheckpointError, match=REFUSED):
        build_config(None, None, str(directory))
    with torch.device("meta"):
        model = Transformer(config)
    with pytest.raises(UnsafeCheckpointError, match=REFUSED):
        load_initial_weights(model, str(directory))
    with pytest.raises(UnsafeCheckpointError, match=REFUSED):
        read_config(directory)
    assert not marker.exists()


def test_pool_from_refuses(hostile_lm: tuple[Path, Path]) -> None:
    from llama2_lightning.callbacks.rejection_sampling import pool_state_from_checkpoint

    directory, marker = hostile_lm
    with pytest.raises((UnsafeCheckpointError, FileNotFoundError), match=r"refused to load|no such checkpoint file"):
        pool_state_from_checkpoint(directory)
    assert not marker.exists()


def test_strategy_resume_reads_the_directory_safely(hostile_lm: tuple[Path, Path]) -> None:
    """`fit --ckpt_path DIR` under ModelParallelStrategy: Lightning builds torch's own reader and
    planner (lightning.fabric's _distributed_checkpoint_load); inside safe_dcp_loading, which the fit
    command holds for the whole run, that reader refuses the directory too."""
    from lightning.fabric.strategies.fsdp import _distributed_checkpoint_load

    directory, marker = hostile_lm
    state = {"state_dict": {"model.norm.weight": torch.empty(64)}}
    with warnings.catch_warnings(), safe_dcp_loading():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointException) as info:  # torch wraps each rank's error: ours is inside
            _distributed_checkpoint_load(state, directory)
    assert any(REFUSED in str(exc) and str(directory) in str(exc) for exc, _ in info.value.failures.values())
    assert not marker.exists()


def test_strategy_resume_non_tensor_entries_are_weights_only(tmp_path: Path) -> None:
    """The second hole in torch's loader: non-tensor entries (optimizer hyper-parameters) are unpickled
    with weights_only=False. A shard whose bytes entry is a hostile pickle is refused as well."""
    import torch.distributed.checkpoint as dcp

    from crafted_checkpoints import _CreatesFile

    marker = tmp_path / "CODE_RAN"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"optimizer_0": {"lr": _CreatesFile(marker)}}, checkpoint_id=str(tmp_path / "dir"))
        assert not marker.exists()  # saving pickles, it does not run anything
        with safe_dcp_loading(), pytest.raises(CheckpointException) as info:
            dcp.load({"optimizer_0": {"lr": None}}, checkpoint_id=str(tmp_path / "dir"))
    assert any(isinstance(exc, pickle.UnpicklingError) for exc, _ in info.value.failures.values())
    assert not marker.exists()


def test_fit_runs_inside_safe_loading(tmp_path: Path) -> None:
    """The guard is in place for the whole `fit` (so the strategy's resume above is covered)."""
    import lightning as L
    from torch.distributed.checkpoint import FileSystemReader

    from llama2_lightning.commands.fit import LlamaLightningCLI
    from llama2_lightning.checkpoint.safe_load import SafeFileSystemReader

    seen: list[bool] = []

    class Probe(L.Trainer):
        def fit(self, *args: object, **kwargs: object) -> None:
            seen.append(FileSystemReader.read_metadata is SafeFileSystemReader.read_metadata)

    cli = LlamaLightningCLI.__new__(LlamaLightningCLI)
    cli.trainer = Probe(default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False)
    cli.config = {"fit": {"trainer": {}}}
    cli.subcommand = "fit"
    cli.fit(torch.nn.Module(), None)  # type: ignore[arg-type]
    assert seen == [True]
    assert FileSystemReader.read_metadata is not SafeFileSystemReader.read_metadata  # restored after


# ----------------------------------------------------------------------------------- unreadable files


# fixed bytes and ids: pytest-xdist requires every worker to collect the same test names
@pytest.mark.parametrize("content", [b"", b"\xb2", b"\x80\x02" + bytes(range(256)) * 4, "truncated"],
                         ids=["empty", "one-byte", "pickle-protocol-then-garbage", "truncated"])
def test_unreadable_checkpoint_files_name_the_path(content: bytes | str, tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    if content == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:700])
    else:
        path.write_bytes(content)  # type: ignore[arg-type]
    with pytest.raises(CheckpointReadError, match=str(path)):
        load_checkpoint(path)


def test_zip_pickle_refusal_names_the_global_and_no_advice_to_disable_safety(tmp_path: Path) -> None:
    import datetime

    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}, "when": datetime.date(2020, 1, 1)}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "datetime.date" in message
    assert "will likely succeed" not in message and "add_safe_globals" not in message
