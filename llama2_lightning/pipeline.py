"""The whole recipe in one command: ``llama2-lightning pipeline --config configs/pipeline/tiny.yaml``.

A pipeline file lists stages; each stage is an ordinary ``llama2-lightning fit`` of a stage config
(``configs/<stage>/*.yaml``) with a few keys changed and the previous stages' checkpoints wired in::

    run_dir: runs/pipeline-tiny            # every stage writes to <run_dir>/<stage name>/
    set: {trainer.enable_progress_bar: false}   # applied to every stage
    stages:
      - name: sft
        config: configs/sft/tiny.yaml
        inputs: {model.init_args.init_from: pretrain}   # key <- that stage's checkpoint
        set: {trainer.max_epochs: 2}                    # key <- value
        metric: val/loss                                # shown on the progress line
    report: {baseline: sft, final: ppo-v5}              # llama2_lightning.report

Keys are dotted paths into the stage YAML. On a list, a number picks an element and a class name
picks the element whose ``class_path`` ends with it (``trainer.callbacks.RejectionSamplingCallback.
init_args.pool_from``). A missing intermediate key is an error naming the pipeline file, the stage
and the key; the last key may be new (LightningCLI then checks it like any command-line option).

For each stage the pipeline writes ``<run_dir>/<name>/stage-config.yaml`` (the merged config, so
``llama2-lightning fit --config`` on it reruns the stage by hand), runs it in a fresh process with
its output in ``stage.log``, and when it succeeds records ``stage.json`` (time, metric, checkpoint).

Rerunning skips every stage with a ``stage.json``; a stage that was interrupted after writing a
checkpoint resumes from it (``--ckpt_path``), so a crash costs at most the work since the last
checkpoint. ``--from-stage NAME`` moves that stage's and every later stage's directory to
``<run_dir>/.superseded/<time>/`` (nothing is deleted) and runs them again.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MARKER = "stage.json"
STAGE_CONFIG = "stage-config.yaml"
STAGE_LOG = "stage.log"
_STAGE_KEYS = ("name", "config", "set", "inputs", "metric", "checkpoint")
_TOP_KEYS = ("run_dir", "set", "stages", "report")


class PipelineError(RuntimeError):
    """A pipeline file that does not validate, or a stage that failed."""


@dataclass
class Stage:
    name: str
    config: Path
    set: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    metric: str | None = None
    checkpoint: str = "checkpoints/last.ckpt"  # the stage's output, relative to its directory


@dataclass
class Pipeline:
    path: Path
    run_dir: Path
    stages: list[Stage]
    set: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] | None = None

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise PipelineError(f"{self.path}: no stage named {name!r}; stages: {[s.name for s in self.stages]}")

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def output(self, name: str) -> Path:
        return self.stage_dir(name) / self.stage(name).checkpoint


# ------------------------------------------------------------------------------------------ loading


def load_pipeline(path: str | os.PathLike[str], run_dir: str | None = None) -> Pipeline:
    """Read and validate a pipeline file; every error names the file and the offending key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"pipeline config {path} not found") from None
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: expected a mapping with keys {', '.join(_TOP_KEYS)}")
    unknown = sorted(set(raw) - set(_TOP_KEYS))
    if unknown:
        raise PipelineError(f"{path}: unknown key(s) {unknown}; allowed: {', '.join(_TOP_KEYS)}")
    if not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise PipelineError(f"{path}: 'stages' must be a non-empty list")
    if not isinstance(raw.get("set") or {}, dict):
        raise PipelineError(f"{path}: 'set' must be a mapping of dotted keys to values")
    stages: list[Stage] = []
    for i, entry in enumerate(raw["stages"]):
        where = f"{path}: stages[{i}]"
        if not isinstance(entry, dict):
            raise PipelineError(f"{where}: expected a mapping with keys {', '.join(_STAGE_KEYS)}")
        unknown = sorted(set(entry) - set(_STAGE_KEYS))
        if unknown:
            raise PipelineError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(_STAGE_KEYS)}")
        name, config = entry.get("name"), entry.get("config")
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise PipelineError(f"{where}.name: a non-empty directory name is required, got {name!r}")
        where = f"{path}: stage {name!r}"
        if any(s.name == name for s in stages):
            raise PipelineError(f"{where}: the name is used twice")
        if not isinstance(config, str) or not Path(config).is_file():
            raise PipelineError(f"{where}.config: {config!r} is not a file (paths are relative to the directory "
                                "you run from: the project root)")
        for key in ("set", "inputs"):
            if not isinstance(entry.get(key) or {}, dict):
                raise PipelineError(f"{where}.{key}: must be a mapping of dotted keys to values")
        inputs = {str(k): v for k, v in (entry.get("inputs") or {}).items()}
        for key, source in inputs.items():
            if source not in [s.name for s in stages]:
                raise PipelineError(f"{where}.inputs.{key}: {source!r} is not an earlier stage; earlier stages: "
                                    f"{[s.name for s in stages]}")
        stages.append(Stage(name, Path(config), dict(entry.get("set") or {}), inputs, entry.get("metric"),
                            entry.get("checkpoint", "checkpoints/last.ckpt")))
    report = raw.get("report")
    if report is not None and not isinstance(report, dict):
        raise PipelineError(f"{path}: 'report' must be a mapping (or absent)")
    rd = run_dir or raw.get("run_dir")
    if not isinstance(rd, str) or not rd:
        raise PipelineError(f"{path}: 'run_dir' (where the stages write) is required")
    pipe = Pipeline(path, Path(rd), stages, dict(raw.get("set") or {}), report)
    for key in ("baseline", "final", "prompts_from"):
        if report and report.get(key) is not None:
            pipe.stage(str(report[key]))  # raises naming the file
    return pipe


def set_key(config: dict[str, Any], key: str, value: Any, where: str = "config") -> None:
    """Set a dotted ``key`` in a nested config (module docstring for list selectors)."""
    parts = key.split(".")
    node: Any = config
    for depth, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: depth + 1]), key, where)
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key, key, where)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise PipelineError(f"{where}: cannot set {key!r}: {'.'.join(parts[:-1])!r} is a {type(node).__name__}, "
                            "not a mapping or list")


def _child(node: Any, part: str, prefix: str, key: str, where: str) -> Any:
    if isinstance(node, dict):
        if part not in node or node[part] is None:
            raise PipelineError(f"{where}: cannot set {key!r}: {prefix!r} is not in the stage config "
                                f"(keys there: {sorted(node)})")
        return node[part]
    if isinstance(node, list):
        return node[_list_index(node, part, prefix, key, where)]
    raise PipelineError(f"{where}: cannot set {key!r}: {prefix!r} is inside a {type(node).__name__}")


def _list_index(node: list[Any], part: str, prefix: str, key: str, where: str) -> int:
    if part.lstrip("-").isdigit():
        i = int(part)
        if not -len(node) <= i < len(node):
            raise PipelineError(f"{where}: cannot set {key!r}: index {i} out of range at {prefix!r} ({len(node)} items)")
        return i
    hits = [i for i, item in enumerate(node)
            if isinstance(item, dict) and str(item.get("class_path", "")).rsplit(".", 1)[-1] == part]
    if len(hits) != 1:
        names = [str(item.get("class_path", "?")).rsplit(".", 1)[-1] for item in node if isinstance(item, dict)]
        raise PipelineError(f"{where}: cannot set {key!r}: {len(hits)} items of class {part!r} at {prefix!r} "
                            f"(classes there: {names})")
    return hits[0]


def stage_config(pipe: Pipeline, stage: Stage, check_inputs: bool = True) -> dict[str, Any]:
    """The stage's YAML with the pipeline's keys applied and its inputs wired (not yet written)."""
    config = yaml.safe_load(stage.config.read_text())
    if not isinstance(config, dict):
        raise PipelineError(f"{stage.config}: a stage config must be a mapping")
    config = copy.deepcopy(config)
    where = f"{pipe.path}: stage {stage.name!r} ({stage.config})"
    set_key(config, "trainer.default_root_dir", str(pipe.stage_dir(stage.name)), where)
    for key, value in {**pipe.set, **stage.set}.items():
        set_key(config, str(key), value, where)
    for key, source in stage.inputs.items():
        ckpt = pipe.output(source)
        if check_inputs and not ckpt.exists():
            raise PipelineError(f"{where}: input {key} <- stage {source!r}: {ckpt} does not exist "
                                f"(run the pipeline from {source!r}: --from-stage {source})")
        set_key(config, key, str(ckpt), where)
    return config


# ------------------------------------------------------------------------------------------ running


def read_metrics(stage_dir: Path) -> list[dict[str, float]]:
    """Every row the stage's ``CSVLogger`` wrote (``<stage>/csv/version_*/metrics.csv``, oldest run
    first, so a resumed stage's rows follow the interrupted run's), empty cells left out."""
    import csv

    rows: list[dict[str, float]] = []
    def version(path: Path) -> int:  # version_10 after version_9
        number = path.parent.name.removeprefix("version_")
        return int(number) if number.isdigit() else 0

    versions = sorted((stage_dir / "csv").glob("version_*/metrics.csv"), key=version)
    for path in versions:
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                parsed = {}
                for k, v in row.items():
                    if v not in (None, ""):
                        try:
                            parsed[k] = float(v)
                        except ValueError:
                            continue
                rows.append(parsed)
    return rows


def last_value(rows: list[dict[str, float]], metric: str) -> float | None:
    for row in reversed(rows):
        if metric in row:
            return row[metric]
    return None


def format_duration(seconds: float, spaced: bool = False) -> str:
    """``3m11s`` (progress lines), or ``3 min 11 s`` with ``spaced`` (report prose)."""
    m, s = divmod(int(round(seconds)), 60)
    if spaced:
        return f"{m} min {s:02d} s" if m else f"{s} s"
    return f"{m}m{s:02d}s" if m else f"{s}s"


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


def run_stage(pipe: Pipeline, stage: Stage, resume: Path | None, echo: bool) -> None:
    """One ``llama2-lightning fit`` in a fresh process; raises ``PipelineError`` with the log's tail."""
    d = pipe.stage_dir(stage.name)
    d.mkdir(parents=True, exist_ok=True)
    config_path = d / STAGE_CONFIG
    config_path.write_text(f"# written by `llama2-lightning pipeline --config {pipe.path}`: stage {stage.name!r}, "
                           f"from {stage.config}\n" + yaml.safe_dump(stage_config(pipe, stage), sort_keys=False))
    cmd = [sys.executable, "-m", "llama2_lightning.cli", "fit", "--config", str(config_path)]
    if resume is not None:
        cmd += ["--ckpt_path", str(resume)]
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")
    env["PYTHONUNBUFFERED"] = "1"
    with (d / STAGE_LOG).open("a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        if echo:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            rc = proc.wait()
        else:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        raise PipelineError(f"stage {stage.name!r} failed (exit {rc}); last lines of {d / STAGE_LOG}:\n"
                            f"{_log_tail(d / STAGE_LOG)}\nfix it and rerun the same command: finished stages are "
                            "skipped and this one resumes from its last checkpoint")
    if not pipe.output(stage.name).exists():
        raise PipelineError(f"stage {stage.name!r} finished but wrote no checkpoint at {pipe.output(stage.name)} "
                            f"(its ModelCheckpoint must save_last into {d}/checkpoints, or set the stage's "
                            "'checkpoint' key)")


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
        resume = ckpt if ckpt.exists() else None
        print_fn(f"{head} {'resuming from ' + str(ckpt) if resume else 'running'} ({stage.config}; log: "
                 f"{d / STAGE_LOG})")
        t0 = time.perf_counter()
        run_stage(pipe, stage, resume, echo)
        elapsed = time.perf_counter() - t0
        rows = read_metrics(d)
        value = last_value(rows, stage.metric) if stage.metric else None
        record = {"stage": stage.name, "config": str(stage.config), "checkpoint": str(ckpt), "elapsed_s": elapsed,
                  "metric": stage.metric, "value": value, "resumed": resume is not None,
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        (d / (MARKER + ".tmp")).write_text(json.dumps(record, indent=2))
        os.replace(d / (MARKER + ".tmp"), marker)
        records[stage.name] = record
        shown = f"  {stage.metric}={value:.4g}" if value is not None else ""
        print_fn(f"{head} done in {format_duration(elapsed)} (pipeline {format_duration(time.perf_counter() - start)}){shown}")
    if report and pipe.report is not None:
        from llama2_lightning.report import write_report

        t0 = time.perf_counter()
        path = write_report(pipe, print_fn=print_fn)
        print_fn(f"report: {path} ({format_duration(time.perf_counter() - t0)}; pipeline "
                 f"{format_duration(time.perf_counter() - start)})")
    return records


def cli_pipeline(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llama2-lightning pipeline",
        description="Run the Llama 2 recipe's stages in order (pretraining, SFT, reward models, rejection "
                    "sampling, PPO), each a `fit` of its own config, then write report.md.")
    parser.add_argument("--config", required=True, help="pipeline YAML, e.g. configs/pipeline/tiny.yaml")
    parser.add_argument("--run-dir", help="override the file's run_dir")
    parser.add_argument("--from-stage", metavar="NAME", help="rerun NAME and every later stage (their old "
                        "directories are moved to <run_dir>/.superseded/)")
    parser.add_argument("--no-report", action="store_true", help="skip report.md")
    parser.add_argument("--report-only", action="store_true", help="only (re)write report.md from finished stages")
    parser.add_argument("--dry-run", action="store_true", help="print each stage's merged config and stop")
    parser.add_argument("--verbose", action="store_true", help="stream every stage's output, not only progress lines")
    args = parser.parse_args(argv)
    try:
        pipe = load_pipeline(args.config, args.run_dir)
        if args.dry_run:
            for stage, config in zip(pipe.stages, stage_configs(pipe).values()):
                print(f"# --- stage {stage.name} ({stage.config})")
                print(yaml.safe_dump(config, sort_keys=False))
            return 0
        if args.report_only:
            from llama2_lightning.report import write_report

            print(f"report: {write_report(pipe)}")
            return 0
        run_pipeline(pipe, args.from_stage, report=not args.no_report, echo=args.verbose)
    except PipelineError as err:
        print(f"llama2-lightning pipeline: {err}", file=sys.stderr)
        return 1
    return 0


def stage_configs(pipe: Pipeline) -> Mapping[str, dict[str, Any]]:
    """Every stage's merged config, inputs not required to exist (for checks and ``--dry-run``)."""
    return {s.name: stage_config(pipe, s, check_inputs=False) for s in pipe.stages}


__all__ = ["Pipeline", "Stage", "PipelineError", "load_pipeline", "set_key", "stage_config", "stage_configs",
           "run_pipeline", "read_metrics", "last_value", "format_duration", "cli_pipeline"]
