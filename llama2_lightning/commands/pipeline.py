"""``llama2-lightning pipeline``: run a pipeline file (see :mod:`llama2_lightning.pipeline`)."""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from llama2_lightning.pipeline.report import write_report
from llama2_lightning.commands.evaluate import build_parser as evaluate_parser
from llama2_lightning.commands.fit import check_fit_config
from llama2_lightning.commands.distill import build_parser as distill_parser
from llama2_lightning.commands.gatt import build_parser as gatt_parser
from llama2_lightning.pipeline.run import PipelineInterrupted, run_pipeline
from llama2_lightning.pipeline.spec import Pipeline, PipelineError, load_pipeline, stage_configs


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
    parser.add_argument("--dry-run", action="store_true", help="check every stage's merged config (each key against the classes "
                        "it configures), print them and stop")
    parser.add_argument("--verbose", action="store_true", help="stream every stage's output, not only progress lines")
    args = parser.parse_args(argv)
    try:
        pipe = load_pipeline(args.config, args.run_dir)
        if args.dry_run:
            configs = stage_configs(pipe)
            check_stage_configs(pipe, configs)
            for stage, config in zip(pipe.stages, configs.values()):
                print(f"# --- stage {stage.name} ({stage.source})")
                print(yaml.safe_dump(config, sort_keys=False))
            print(f"# every stage's config parses ({len(configs)} stages): keys and types checked, nothing run")
            return 0
        if args.report_only:
            print(f"report: {write_report(pipe)}")
            return 0
        run_pipeline(pipe, args.from_stage, report=not args.no_report, echo=args.verbose)
    except PipelineInterrupted as err:
        print(f"llama2-lightning pipeline: {err}", file=sys.stderr)
        return err.exit_status
    except PipelineError as err:
        print(f"llama2-lightning pipeline: {err}", file=sys.stderr)
        return 1
    return 0


def check_stage_configs(pipe: Pipeline, configs: Mapping[str, dict[str, Any]]) -> None:
    """Parse each merged stage config as ``fit --config`` would (every leaf key checked against the
    classes it configures) without running it, so a typo fails before the first stage starts."""
    with tempfile.TemporaryDirectory(prefix="pipeline-check-") as tmp:
        for name, config in configs.items():
            if pipe.stage(name).command is not None:
                check_command_args(pipe, name, config["argv"])
                continue
            path = Path(tmp) / f"{name}.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            try:
                check_fit_config(path)
            except ValueError as err:
                detail = str(err).split(": ", 1)[-1]
                raise PipelineError(f"{pipe.path}: stage {name!r} ({pipe.stage(name).config}): the merged config "
                                    f"does not parse: {detail}") from None


def command_parsers() -> dict[str, Callable[[], argparse.ArgumentParser]]:
    """The argument parser of each command a stage may run (spec.COMMAND_OUTPUTS)."""
    return {"gatt": gatt_parser, "distill": distill_parser, "evaluate": evaluate_parser}


def check_command_args(pipe: Pipeline, name: str, argv: list[str]) -> None:
    """Parse a command stage's options with the command's own parser, so a mistyped option fails here."""
    stage = pipe.stage(name)
    parser = command_parsers()[str(stage.command)]()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser.parse_args(argv)
    except SystemExit:
        detail = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "bad options"
        raise PipelineError(f"{pipe.path}: stage {name!r} ({stage.source}): its args do not parse: {detail}") from None
