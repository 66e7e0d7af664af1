"""SIGTERM to the pipeline: the running stage's `fit` is told to stop, saves, and is waited for (no
orphan keeps writing); the stage is not marked done; a rerun resumes it, and when its last.ckpt
is corrupt, from the newest readable step checkpoint instead."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
from fit_configs import tiny_fit_config, write_config


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_to_the_pipeline_stops_its_stage_which_resumes_on_rerun(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    waiter = {"class_path": "wait_for_signal.WaitForSignal", "init_args": {"ready_file": str(ready), "at_step": 2}}
    stage_config = write_config(tmp_path / "pre.yaml", tiny_fit_config(tmp_path / "unused", 4, [waiter]))
    run_dir = tmp_path / "pipe"
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"run_dir": str(run_dir), "stages": [{"name": "pre", "config": str(stage_config)}]}))
    cmd = [sys.executable, "-m", "llama2_lightning.cli", "pipeline", "--config", str(pipeline)]

    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    stage = run_dir / "pre"
    child = json.loads((stage / ".llama2-lightning.lock").read_text())["pid"]
    assert child != proc.pid and _alive(child)

    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 143, out
    assert "stopped on SIGTERM" in out
    assert not _alive(child)  # waited for, not orphaned
    assert not (stage / "stage.json").exists()
    assert json.loads((stage / "fit-status.json").read_text())["completed"] is False

    # The interrupted stage's last.ckpt is damaged (a full disk, say): the rerun says so and resumes
    # from step2.ckpt, the newest readable one.
    last = stage / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:100])
    rerun = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"{last} is unreadable" in rerun.stdout and "resuming from" in rerun.stdout
    assert "step2.ckpt" in rerun.stdout
    record = json.loads((stage / "stage.json").read_text())
    assert record["resumed"] is True
    assert torch.load(last, weights_only=True)["global_step"] == 4
