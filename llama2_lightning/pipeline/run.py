"""Running a pipeline's stages, each a ``llama2-lightning fit`` (or another command) in a fresh process,
with resume and skip.

A fit stage is done when its ``fit`` exited 0 *and* recorded in ``fit-status.json`` that training reached
its end (:class:`~llama2_lightning.callbacks.RunStatus`); a command stage (``gatt``, ``evaluate``) when it
exited 0 and wrote its output file (commands write it atomically, so a stopped one is simply run again).
Only then is ``stage.json`` written. SIGTERM
or SIGINT to the pipeline stops the running stage cleanly (it saves and exits) and is waited for.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from llama2_lightning.checkpoint.lightning import checkpoint_problem
from llama2_lightning.fit_status import read_status, status_path
from llama2_lightning.pipeline.metrics import format_duration, last_value, read_metrics
from llama2_lightning.pipeline.report import write_report
from llama2_lightning.pipeline.spec import MARKER, STAGE_CONFIG, STAGE_LOG, Pipeline, PipelineError, Stage, stage_config


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def supersede(pipe: Pipeline, from_stage: str) -> list[Path]:
    """Move ``from_stage``'s and every later stage's directory aside; returns where they went."""
    names = [s.name for s in pipe.stages]
    start = names.index(pipe.stage(from_stage).name)
    dest = pipe.run_dir / ".superseded" / time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for name in names[start:]:
        src = pipe.stage_dir(name)
        if src.exists():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), str(dest / name))
            moved.append(dest / name)
    return moved


class PipelineInterrupted(PipelineError):
    """SIGTERM or SIGINT reached the pipeline; the running stage was stopped and waited for."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_status = 128 + signum  # 143 for SIGTERM, 130 for SIGINT, as a shell reports them


@contextlib.contextmanager
def _forward_signals(proc: subprocess.Popen, received: list[int]) -> Iterator[None]:
    """While the stage runs, SIGTERM and SIGINT to the pipeline become SIGTERM to the stage: its
    ``fit`` then saves a resumable checkpoint at the next batch boundary and exits 143, and the
    pipeline waits for that instead of leaving an orphan writing into the run directory. (SIGINT
    is sent on as SIGTERM because a KeyboardInterrupt can land mid-step, where no consistent
    checkpoint exists.)"""
    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    try:
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread: signals cannot be caught here
        previous = {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_stage(pipe: Pipeline, stage: Stage, resume: Path | None, echo: bool) -> None:
    """One ``llama2-lightning fit`` (or the stage's command) in a fresh process; raises ``PipelineError``
    with the log's tail, or :class:`PipelineInterrupted` when the pipeline was told to stop."""
    d = pipe.stage_dir(stage.name)
    d.mkdir(parents=True, exist_ok=True)
    config_path = d / STAGE_CONFIG
    config = stage_config(pipe, stage)
    config_path.write_text(f"# written by `llama2-lightning pipeline --config {pipe.path}`: stage {stage.name!r}, "
                           f"from {stage.source}\n" + yaml.safe_dump(config, sort_keys=False))
    if stage.command is not None:
        cmd = [sys.executable, "-m", "llama2_lightning.cli", stage.command, *config["argv"]]
    else:
        cmd = [sys.executable, "-m", "llama2_lightning.cli", "fit", "--config", str(config_path)]
    if resume is not None:
        cmd += ["--ckpt_path", str(resume)]
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")
    env["PYTHONUNBUFFERED"] = "1"
    status_path(d).unlink(missing_ok=True)  # only this run's fit may say the stage completed
    received: list[int] = []
    with (d / STAGE_LOG).open("a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        # Its own session: a terminal's Ctrl-C reaches only the pipeline, which forwards it once.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE if echo else log, stderr=subprocess.STDOUT, text=True,
                                env=env, start_new_session=True)
        with _forward_signals(proc, received):
            if echo:
                assert proc.stdout is not None
                for line in proc.stdout:
                    sys.stdout.write(line)
                    log.write(line)
            rc = proc.wait()
    if received:
        name = signal.Signals(received[0]).name
        raise PipelineInterrupted(f"stage {stage.name!r} stopped on {name} (fit exit {rc}); rerun the same command "
                                  "to resume it from its last checkpoint", received[0])
    if rc != 0:
        raise PipelineError(f"stage {stage.name!r} failed (exit {rc}); last lines of {d / STAGE_LOG}:\n"
                            f"{_log_tail(d / STAGE_LOG)}\nfix it and rerun the same command: finished stages are "
                            "skipped and this one resumes from its last checkpoint")
    if stage.command is not None:
        if not pipe.output(stage.name).exists():
            raise PipelineError(f"stage {stage.name!r} ({stage.command}) exited 0 but wrote no {pipe.output(stage.name)}")
        return
    if not pipe.output(stage.name).exists():
        raise PipelineError(f"stage {stage.name!r} finished but wrote no checkpoint at {pipe.output(stage.name)} "
                            f"(its ModelCheckpoint must save_last into {d}/checkpoints, or set the stage's "
                            "'checkpoint' key)")
    status = read_status(d)
    if not (status and status.get("completed")):
        raise PipelineError(f"stage {stage.name!r}: fit exited 0 but did not record that training reached its end "
                            f"({status_path(d)}: {status}); rerun the same command to resume it")


def resume_checkpoint(ckpt: Path, print_fn: Callable[[str], None] = print) -> Path | None:
    """The checkpoint an interrupted stage resumes from: ``ckpt`` (its ``last.ckpt``) when it is
    readable, else the newest readable ``step*.ckpt`` beside it (saying so), else None (start over)."""
    if not ckpt.exists():
        return None
    problem = checkpoint_problem(ckpt)
    if problem is None:
        return ckpt
    def step(path: Path) -> int:
        digits = re.findall(r"\d+", path.stem)
        return int(digits[-1]) if digits else -1
    for candidate in sorted(ckpt.parent.glob("step*.ckpt"), key=step, reverse=True):
        if checkpoint_problem(candidate) is None:
            print_fn(f"  {ckpt} is unreadable ({problem}); resuming from {candidate}, the newest readable "
                     "step checkpoint, instead")
            return candidate
    print_fn(f"  {ckpt} is unreadable ({problem}) and no readable step*.ckpt is beside it: running the stage "
             "from the start")
    return None


def run_pipeline(pipe: Pipeline, from_stage: str | None = None, report: bool = True, echo: bool = False,
                 print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage that has not finished, then write the report; returns the stages' records."""
    if from_stage is not None:
        for moved in supersede(pipe, from_stage):
            print_fn(f"moved {moved.name} aside to {moved}")
    pipe.run_dir.mkdir(parents=True, exist_ok=True)
    n = len(pipe.stages)
    start = time.perf_counter()
    records: dict[str, Any] = {}
    for i, stage in enumerate(pipe.stages, start=1):
        d = pipe.stage_dir(stage.name)
        marker = d / MARKER
        head = f"[{i}/{n}] {stage.name:<14}"
        if marker.exists() and pipe.output(stage.name).exists():
            records[stage.name] = json.loads(marker.read_text())
            print_fn(f"{head} done earlier, skipped ({records[stage.name]['checkpoint']})")
            continue
        ckpt = pipe.output(stage.name)
        resume = resume_checkpoint(ckpt, print_fn) if stage.command is None else None
        print_fn(f"{head} {'resuming from ' + str(resume) if resume else 'running'} ({stage.source}; log: "
                 f"{d / STAGE_LOG})")
        t0 = time.perf_counter()
        run_stage(pipe, stage, resume, echo)
        elapsed = time.perf_counter() - t0
        rows = read_metrics(d)
        value = last_value(rows, stage.metric) if stage.metric else None
        record = {"stage": stage.name, "config": stage.source, "checkpoint": str(ckpt), "elapsed_s": elapsed,
                  "metric": stage.metric, "value": value, "resumed": resume is not None,
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        if stage.command is not None and ckpt.suffix == ".json":  # a command's one-line summary, if it gives one
            record["headline"] = str(json.loads(ckpt.read_text()).get("headline") or "")
        (d / (MARKER + ".tmp")).write_text(json.dumps(record, indent=2))  # the marker last: the stage is done
        os.replace(d / (MARKER + ".tmp"), marker)
        records[stage.name] = record
        shown = f"  {stage.metric}={value:.4g}" if value is not None else f"  {record.get('headline', '')}".rstrip()
        print_fn(f"{head} done in {format_duration(elapsed)} (pipeline {format_duration(time.perf_counter() - start)}){shown}")
    if report and pipe.report is not None:
        t0 = time.perf_counter()
        path = write_report(pipe, print_fn=print_fn)
        print_fn(f"report: {path} ({format_duration(time.perf_counter() - t0)}; pipeline "
                 f"{format_duration(time.perf_counter() - start)})")
    return records
