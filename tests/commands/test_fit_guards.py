"""The `fit` command on a shared cluster: SIGTERM saves a resumable checkpoint and exits 143 (not 0),
only a run that reached its end records completion, a second run on a held directory fails at once,
stale temporary checkpoint files are removed, checkpoints get the umask's permissions. Real
subprocesses on the `tiny` preset; tests/wait_for_signal.py holds a run at a known step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
from fit_configs import tiny_fit_config, write_config


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


def _fit(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llama2_lightning.cli", "fit", "--config", str(config), *extra],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, limit_s: float = 600) -> None:
    """Until ``path`` exists; fails (with the process's output) if the process ends first."""
    deadline = time.monotonic() + limit_s
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            out = proc.communicate()[0] if proc.poll() is not None else "(still running)"
            proc.kill()
            pytest.fail(f"{path} never appeared; fit output:\n{out[-3000:]}")
        time.sleep(0.1)


def _held_run(tmp_path: Path, max_steps: int) -> tuple[Path, Path, Path]:
    run, ready = tmp_path / "run", tmp_path / "ready"
    waiter = {"class_path": "wait_for_signal.WaitForSignal", "init_args": {"ready_file": str(ready), "at_step": 2}}
    return write_config(tmp_path / "fit.yaml", tiny_fit_config(run, max_steps, [waiter])), run, ready


def test_sigterm_saves_a_resumable_checkpoint_and_exits_143_and_the_lock_refuses_a_second_run(tmp_path: Path) -> None:
    config, run, ready = _held_run(tmp_path, max_steps=4)
    first = _fit(config)
    _wait_for(ready, first)

    # The directory is held: a second fit on it fails at once, naming the holder.
    second = subprocess.run([sys.executable, "-m", "llama2_lightning.cli", "fit", "--config", str(config)],
                            env=_env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 1
    assert f"is in use by another run (pid {first.pid} on host" in second.stderr
    assert not (run / "csv" / "version_1").exists()  # it wrote nothing

    first.send_signal(signal.SIGTERM)
    out = first.communicate(timeout=600)[0]
    assert first.returncode == 143, out[-3000:]
    status = json.loads((run / "fit-status.json").read_text())
    assert status["completed"] is False and status["reason"] == "sigterm" and status["global_step"] == 2
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert oct(last.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not mkstemp's 0600

    # A temporary file a killed save left behind is removed on the next start.
    stale = run / "checkpoints" / ".last.ckpt.abc123.tmp"
    stale.write_bytes(b"\0" * 1024)

    resumed = subprocess.run([sys.executable, "-m", "llama2_lightning.cli", "fit", "--config", str(config),
                              "--ckpt_path", str(last)], env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert not stale.exists()
    status = json.loads((run / "fit-status.json").read_text())
    assert status["completed"] is True and status["global_step"] == 4
    assert torch.load(last, weights_only=True)["global_step"] == 4


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
