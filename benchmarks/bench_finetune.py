"""What each ``finetune:`` option costs in time and in quality: the same SFT run (same data, steps, seed)
with full fine-tuning beside LoRA through peft, the top N blocks only, and both.

Each option is one ``llama2-lightning fit`` of ``--config`` (default ``configs/sft/smollm2-135m.yaml``, the
real-model SFT stage) in its own process, then, with ``--gatt-dialogs`` > 0, one ``llama2-lightning
evaluate`` of its checkpoint on the held-out GAtt dialogs. The table gives the fit's wall time (process
start to checkpoint), the held-out answer-token loss and accuracy the run logged (``val/loss``,
``val/acc``), and the GAtt adherence at turns 3-5. Every option is measured in this one run, on this
machine, one after another; ``full`` is the peer the others are read against. ``--dialogs`` is the GAtt
dialog file the SFT config's second source reads (a pipeline run's ``gatt/dialogs.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from llama2_lightning.evaluation.instructions import late_turn_adherence
from llama2_lightning.pipeline.metrics import last_value, read_metrics
from llama2_lightning.pipeline.spec import PipelineError, load_pipeline, set_key

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = ("full", "lora", "blocks", "both")

PIPELINE = ROOT / "configs" / "pipeline" / "smollm2-135m.yaml"
EVAL_STAGE = "eval-base"  # the pipeline's GAtt evaluation before SFT: the same prompts, turns and answer length


def eval_args(pipeline: Path, stage: str = EVAL_STAGE) -> dict[str, Any]:
    """The options the pipeline's ``stage`` passes to ``llama2-lightning evaluate``, less the ones each option
    sets itself (its checkpoint, the dialog count, the output): the evaluation the pipeline reports, so a
    finetune option is read on the same held-out dialogs. A pipeline file that does not load, or whose stage
    is not an evaluate stage, exits with the reason before any fit runs."""
    try:
        found = load_pipeline(pipeline).stage(stage)
    except (OSError, PipelineError) as err:
        raise SystemExit(f"--pipeline: {err}") from None
    if found.command != "evaluate":
        raise SystemExit(f"{pipeline}: stage {stage!r} runs {found.source}, not `llama2-lightning evaluate`")
    return {k: v for k, v in found.args.items() if k not in ("checkpoint", "gatt-dialogs")}


def option_argv(options: dict[str, Any]) -> list[str]:
    """Command-line options as a pipeline stage passes them: ``true`` a bare flag, ``false`` left out, a list
    the option repeated, anything else ``--key value``."""
    argv: list[str] = []
    for key, value in options.items():
        for v in value if isinstance(value, list) else [value]:
            if v is True:
                argv.append(f"--{key}")
            elif v is not False:
                argv += [f"--{key}", str(v)]
    return argv


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "sft" / "smollm2-135m.yaml")
    p.add_argument("--dialogs", type=Path, help="GAtt dialogs for the config's second source (default: the config's)")
    p.add_argument("--options", nargs="+", choices=OPTIONS, default=list(OPTIONS))
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--blocks", type=int, default=4, help="trainable_blocks for `blocks` and `both`")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the config's max_steps)")
    p.add_argument("--gatt-dialogs", type=int, default=6, help="held-out GAtt dialogs per instruction (0: skip)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-finetune")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", type=key_value,
                   help="config keys set for every option (dotted, list items by index; VALUE is YAML), "
                        "e.g. model.init_args.init_from=other.gguf")
    p.add_argument("--pipeline", type=Path, default=PIPELINE,
                   help=f"the pipeline whose {EVAL_STAGE!r} stage gives the evaluate options (default: %(default)s)")
    p.add_argument("--eval-set", nargs="*", default=[], metavar="OPTION=VALUE", type=key_value,
                   help=f"evaluate options over the pipeline's {EVAL_STAGE!r} ones, e.g. gatt-turns=3")
    p.add_argument("--quick", action="store_true", help="2 steps, 1 GAtt dialog (a smoke test; numbers mean nothing)")
    return p


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or key.startswith("-"):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE without leading dashes, got {text!r}")
    return key, value


def _run(cmd: list[str], log: Path) -> float:
    """Runs ``cmd`` with its output in ``log``; returns the wall seconds. A failure names the log."""
    env = {**os.environ, "WANDB_MODE": "disabled"}  # the table is the output; no wandb run per option
    start = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd[2:5])} failed (exit {rc}); its output is in {log}")
    return time.perf_counter() - start


def finetune_group(option: str, rank: int, blocks: int) -> dict[str, int] | None:
    """The ``model.init_args.finetune`` group of an option (None: full fine-tuning)."""
    group = {"lora": {"lora_rank": rank}, "blocks": {"trainable_blocks": blocks},
             "both": {"lora_rank": rank, "trainable_blocks": blocks}}
    return group.get(option)


def option_config(option: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """``--config`` with this option's ``finetune`` group, the run directory, steps, dialogs and ``--set``."""
    config = yaml.safe_load(args.config.read_text())
    keys: list[tuple[str, Any]] = [("trainer.default_root_dir", str(out)), ("trainer.enable_progress_bar", False)]
    group = finetune_group(option, args.lora_rank, args.blocks)
    if group is not None:  # full: the module's default group (a null one does not parse)
        keys.append(("model.init_args.finetune", group))
    if args.steps:
        keys += [("trainer.max_steps", args.steps), ("trainer.val_check_interval", args.steps)]
    if args.dialogs:
        keys.append(("data.init_args.sources.1.path", str(args.dialogs)))
    keys += [(k, yaml.safe_load(v)) for k, v in args.set]
    for key, value in keys:
        set_key(config, key, value, where=f"{args.config} ({option})")
    return config


def measure(option: str, args: argparse.Namespace) -> dict[str, Any]:
    out = args.out / option
    shutil.rmtree(out, ignore_errors=True)  # a rerun's checkpoint would be `last-v1.ckpt` beside the old one
    out.mkdir(parents=True)
    config = out / "config.yaml"
    config.write_text(yaml.safe_dump(option_config(option, args, out), sort_keys=False))
    fit = [sys.executable, "-m", "llama2_lightning.cli", "fit", "--config", str(config)]
    row: dict[str, Any] = {"option": option, "fit_s": _run(fit, out / "fit.log")}
    logged = read_metrics(out)  # the config's CSVLogger, in a directory made fresh above
    row.update({k: last_value(logged, k) for k in ("val/loss", "val/acc")})
    row["gatt_late"] = None
    if args.gatt_dialogs > 0:
        result = out / "evaluation.json"
        options = {**args.eval_options, **dict(args.eval_set)}
        _run([sys.executable, "-m", "llama2_lightning.cli", "evaluate", "--checkpoint",
              str(out / "checkpoints" / "last.ckpt"), "--gatt-dialogs", str(args.gatt_dialogs),
              "--output", str(result), *option_argv(options)],
             out / "evaluate.log")
        row["gatt_late"] = late_turn_adherence(json.loads(result.read_text())["gatt"]["mean_by_turn"])
    return row


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    def num(v: float | None, spec: str) -> str:
        return "n/a" if v is None else format(v, spec)

    full = next((r["fit_s"] for r in rows if r["option"] == "full"), None)
    lines = ["| finetune | fit wall s | vs full | val answer loss | val answer-token accuracy | GAtt turns 3+ |",
             "|---|--:|--:|--:|--:|--:|"]
    for r in rows:
        ratio = num(r["fit_s"] / full if full else None, ".2f")
        lines.append(f"| {r['option']} | {r['fit_s']:.0f} | {ratio} | {num(r['val/loss'], '.3f')} | "
                     f"{num(r['val/acc'], '.3f')} | {num(r['gatt_late'], '.3f')} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.steps, args.gatt_dialogs = 2, min(args.gatt_dialogs, 1)
    args.eval_options = eval_args(args.pipeline) if args.gatt_dialogs > 0 else {}  # checked before any fit
    rows = [measure(o, args) for o in args.options]
    table = format_rows(rows)
    print(f"{args.config.name}, {args.steps or 'config'} steps, LoRA rank {args.lora_rank}, top {args.blocks} blocks")
    print(table)
    return {"rows": rows, "table": table}


if __name__ == "__main__":
    main()
