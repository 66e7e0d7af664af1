"""The pipeline file: stages, their configs and the keys the pipeline sets in them.

A stage is either a ``fit`` of a stage config (``config:``) or one of the package's other commands
(``command:``, one of :data:`COMMAND_OUTPUTS`) whose options are ``args`` and whose ``inputs`` name
earlier stages' outputs by option (``{checkpoint: sft}`` passes ``--checkpoint <sft's last.ckpt>``).
A command stage writes one output file in its directory (``--output``, :data:`COMMAND_OUTPUTS`), which
later stages take through ``inputs`` like a checkpoint.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llama2_lightning.mapping_checks import check_entry

MARKER = "stage.json"
STAGE_CONFIG = "stage-config.yaml"
STAGE_LOG = "stage.log"
_STAGE_KEYS = ("name", "config", "command", "args", "set", "inputs", "metric", "checkpoint")
_TOP_KEYS = ("run_dir", "set", "stages", "report")
# The commands a stage may run besides `fit`, and the file each writes in its stage directory.
COMMAND_OUTPUTS = {"gatt": "dialogs.jsonl", "distill": "dialogs.jsonl", "evaluate": "evaluation.json"}
_OPTION = re.compile(r"^[a-z][a-z0-9-]*$")


class PipelineError(RuntimeError):
    """A pipeline file that does not validate, or a stage that failed."""


@dataclass
class Stage:
    name: str
    config: Path | None  # a fit's stage config; None for a command stage
    set: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    metric: str | None = None
    checkpoint: str = "checkpoints/last.ckpt"  # the stage's output, relative to its directory
    command: str | None = None  # a key of COMMAND_OUTPUTS, or None for a fit
    args: dict[str, Any] = field(default_factory=dict)  # the command's options (without the leading --)

    @property
    def source(self) -> str:
        """What the stage runs, for progress lines and the report."""
        return str(self.config) if self.config is not None else f"llama2-lightning {self.command}"


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
        for key in ("set", "inputs", "args"):
            if not isinstance(entry.get(key) or {}, dict):
                raise PipelineError(f"{where}.{key}: must be a mapping of {'options' if key == 'args' else 'dotted keys'}"
                                    " to values")
        inputs = {str(k): v for k, v in (entry.get("inputs") or {}).items()}
        for key, source in inputs.items():
            if source not in [s.name for s in stages]:
                raise PipelineError(f"{where}.inputs.{key}: {source!r} is not an earlier stage; earlier stages: "
                                    f"{[s.name for s in stages]}")
        command = entry.get("command")
        if command is None:
            if not isinstance(config, str) or not Path(config).is_file():
                raise PipelineError(f"{where}.config: {config!r} is not a file (paths are relative to the directory "
                                    "you run from: the project root)")
            if entry.get("args"):
                raise PipelineError(f"{where}.args: only a command stage takes args; a fit stage changes its "
                                    "config with 'set'")
            stages.append(Stage(name, Path(config), dict(entry.get("set") or {}), inputs, entry.get("metric"),
                                entry.get("checkpoint", "checkpoints/last.ckpt")))
            continue
        stages.append(_command_stage(entry, name, where, inputs))
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
    evaluation = (report or {}).get("evaluation")
    if evaluation is not None:
        if not isinstance(evaluation, dict):
            raise PipelineError(f"{path}: report.evaluation must be a mapping of roles to evaluate stages")
        for key, name in evaluation.items():
            if key in EVALUATION_ROLES and name is not None and pipe.stage(str(name)).command != "evaluate":
                raise PipelineError(f"{path}: report.evaluation.{key}: stage {name!r} is not an evaluate stage")
    return pipe


# Keys of report.evaluation that name an `evaluate` stage (pipeline/evaluation_report.py).
EVALUATION_ROLES = ("before", "after", "gatt_before", "gatt_after")


def _command_stage(entry: Mapping[str, Any], name: str, where: str, inputs: dict[str, str]) -> Stage:
    command = entry["command"]
    if command not in COMMAND_OUTPUTS:
        raise PipelineError(f"{where}.command: {command!r} is not a command a stage can run; allowed: "
                            f"{', '.join(COMMAND_OUTPUTS)} (or give 'config' for a fit)")
    for key in ("config", "set", "metric"):
        if entry.get(key) is not None:
            raise PipelineError(f"{where}.{key}: a command stage ({command}) takes 'args' and 'inputs', not {key!r}")
    args = {k: v for k, v in (entry.get("args") or {}).items() if v is not None}  # null: not passed (a YAML
    for key, value in [*args.items(), *inputs.items()]:                           # merge cannot delete a key)
        if not isinstance(key, str) or not _OPTION.match(key) or key == "output":
            raise PipelineError(f"{where}: {key!r} is not an option of `{command}` the pipeline can pass (lower-case "
                                "words joined by '-', without the leading '--'; 'output' is set by the pipeline)")
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (str, int, float, bool)) for v in values):
            raise PipelineError(f"{where}.args.{key}: expected a string, number, boolean or list of them, got {value!r}")
    clash = sorted(set(args) & set(inputs))
    if clash:
        raise PipelineError(f"{where}: {clash} given in both args and inputs")
    output = entry.get("checkpoint", COMMAND_OUTPUTS[command])
    return Stage(name, None, {}, inputs, None, output, command, args)


def command_argv(pipe: Pipeline, stage: Stage, check_inputs: bool = True) -> list[str]:
    """A command stage's options: its ``args`` (``true``: a bare flag, ``false``: left out, a list: the
    option repeated), its ``inputs`` as earlier stages' outputs, and ``--output`` in its directory."""
    argv: list[str] = []
    for key, value in stage.args.items():
        for v in value if isinstance(value, list) else [value]:
            if v is True:
                argv.append(f"--{key}")
            elif v is not False:
                argv += [f"--{key}", str(v)]
    for key, source in stage.inputs.items():
        out = pipe.output(source)
        if check_inputs and not out.exists():
            raise PipelineError(f"{pipe.path}: stage {stage.name!r}: input --{key} <- stage {source!r}: {out} does "
                                f"not exist (run the pipeline from {source!r}: --from-stage {source})")
        argv += [f"--{key}", str(out)]
    return argv + ["--output", str(pipe.output(stage.name))]


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
    """The stage's YAML with the pipeline's keys applied and its inputs wired (not yet written); for a
    command stage, ``{"command": ..., "args": {...}, "argv": [...]}``."""
    if stage.config is None:
        return {"command": stage.command, "args": dict(stage.args),
                "argv": command_argv(pipe, stage, check_inputs)}
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
