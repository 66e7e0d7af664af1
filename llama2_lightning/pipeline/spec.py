"""The pipeline file: stages, their configs and the keys the pipeline sets in them."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llama2_lightning.mapping_checks import check_entry

MARKER = "stage.json"
STAGE_CONFIG = "stage-config.yaml"
STAGE_LOG = "stage.log"
_STAGE_KEYS = ("name", "config", "set", "inputs", "metric", "checkpoint")
_TOP_KEYS = ("run_dir", "set", "stages", "report")


class PipelineError(RuntimeError):
    """A pipeline file that does not validate, or a stage that failed."""


@dataclass


@dataclass
class Stage:
    name: str
    config: Path
    set: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    metric: str | None = None
    checkpoint: str = "checkpoints/last.ckpt"  # the stage's output, relative to its directory


@dataclass


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
        entry = check_entry(entry, where, _STAGE_KEYS, f"a mapping with keys {', '.join(_STAGE_KEYS)}", PipelineError)
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


def stage_configs(pipe: Pipeline) -> Mapping[str, dict[str, Any]]:
    """Every stage's merged config, inputs not required to exist (for checks and ``--dry-run``)."""
    return {s.name: stage_config(pipe, s, check_inputs=False) for s in pipe.stages}
