"""``report.md`` and its plots for a finished pipeline (``llama2_lightning.pipeline``).

Every number and plot comes from what the stages logged (their ``CSVLogger`` files, read back with
``pipeline.read_metrics``) except one evaluation made here (``rlhf.rollout`` on each bare policy): the
baseline (SFT) and final policies answer the same held-out prompts with the same sampling seeds, and
the prompts_from stage's reward function scores both: the paper's Figure 11 idea at small scale.

Plots need matplotlib (``pip install llama2-lightning[report]``); without it the report has the
tables only and says so. With wandb on (``WANDB_MODE`` other than ``disabled``), the tables and
plots also go to a wandb run (offline unless ``WANDB_MODE=online``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.cli import instantiate_class
from torch.distributed.device_mesh import DeviceMesh

from llama2_lightning.checkpoint import read_config
from llama2_lightning.data.prompts import PromptDataModule
from llama2_lightning.modules.common import build_transformer
from llama2_lightning.pipeline.evaluation_report import evaluation_sections
from llama2_lightning.pipeline.metrics import format_duration, last_value, read_metrics
from llama2_lightning.pipeline.spec import MARKER, STAGE_CONFIG, Pipeline, stage_config
from llama2_lightning.reward_functions import RewardFunction
from llama2_lightning.rlhf.experience import heldout_seed
from llama2_lightning.rlhf.rollout import sample_rollout, score_rollout

REPORT_DEFAULTS = {"baseline": None, "final": None, "prompts_from": None, "max_prompts": 128, "table_rows": 8,
                   "wandb": True, "evaluation": None}  # evaluation: roles of the evaluate stages (evaluation_report)


# ------------------------------------------------------------------------------------ stage facts


def merged_config(pipe: Pipeline, name: str) -> dict[str, Any]:
    """The config the stage ran with (its ``stage-config.yaml``; rebuilt when absent)."""
    path = pipe.stage_dir(name) / STAGE_CONFIG
    if path.is_file():
        return yaml.safe_load(path.read_text())
    return stage_config(pipe, pipe.stage(name), check_inputs=False)


def stage_kind(config: dict[str, Any]) -> str:
    """``pretrain | sft | reward | ppo | rejection_sampling | other`` from the module's class_path; a command
    stage's command (``gatt``, ``evaluate``)."""
    if "command" in config:
        return str(config["command"])
    model = config.get("model") or {}
    cls = str(model.get("class_path", "")).rsplit(".", 1)[-1]
    if cls == "RLHFModule":  # the experience callback decides the algorithm
        callbacks = [str(c.get("class_path") if isinstance(c, dict) else c) for c in (config.get("trainer") or {})
                     .get("callbacks") or []]
        return "ppo" if any(c.endswith("PPOCallback") for c in callbacks) else "rejection_sampling"
    return {"PretrainModule": "pretrain", "SFTModule": "sft", "RewardModule": "reward"}.get(cls, "other")


def series(rows: Sequence[dict[str, float]], metric: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(x, y) of every row that logged ``metric``."""
    xs, ys = [], []
    for row in (r for r in rows if metric in r and x in r):
        xs.append(row[x])
        ys.append(row[metric])
    return xs, ys


def epoch_series(rows: Sequence[dict[str, float]], metric: str) -> dict[int, float]:
    """``metric`` per epoch (the last value logged in each), for one-epoch-per-iteration RLHF runs."""
    return {int(row["epoch"]): row[metric] for row in rows if metric in row and "epoch" in row}


# ------------------------------------------------------------------------------ held-out evaluation


@dataclass
class HeldoutAnswer:
    prompt: str
    is_safety: bool
    answer: str
    reward: float  # the reward function's "reward" (Llama2DualReward: logit of the gated score)
    parts: dict[str, float]


def answer_heldout(checkpoint: str | Path, datamodule: PromptDataModule, reward: RewardFunction,
                   max_new_tokens: int, temperature: float = 1.0, val_seed: int = 1234,
                   device_mesh: DeviceMesh | None = None) -> list[HeldoutAnswer]:
    """Answer and score every held-out prompt of ``datamodule`` with the policy in ``checkpoint``, with the
    seeds of ``RLHFModule``'s validation on one data-parallel replica. With a ``device_mesh`` (every rank
    calling) the policy is built as training does it and decodes on its TP shards, never gathered."""
    tokenizer, policy = datamodule.tokenizer, build_transformer(read_config(checkpoint), str(checkpoint),
                                                                device_mesh=device_mesh)
    policy.eval()
    reward.setup(policy.output.weight.device, tokenizer, device_mesh)
    out: list[HeldoutAnswer] = []
    for batch_idx, batch in enumerate(datamodule.val_dataloader()):
        rollout = sample_rollout(policy, tokenizer, batch, heldout_seed(val_seed, batch_idx, rank=0),
                                 max_new_tokens=max_new_tokens, temperature=temperature)
        parts = score_rollout(reward, rollout)
        for i in range(len(rollout.answers)):
            out.append(HeldoutAnswer(
                prompt=rollout.messages[i][-1]["content"], is_safety=bool(rollout.is_safety[i]),
                answer=rollout.answers[i], reward=float(parts["reward"][i]),
                parts={k: float(v[i]) for k, v in parts.items() if k != "reward"}))
    return out


def compare_heldout(pipe: Pipeline, options: dict[str, Any]) -> dict[str, Any]:
    """Baseline vs final policy on the prompts_from stage's held-out prompts (module docstring)."""
    source = options["prompts_from"]
    config = merged_config(pipe, source)
    data = dict(config["data"])
    data["init_args"] = {**(data.get("init_args") or {}), "max_val_prompts": options["max_prompts"]}
    datamodule = instantiate_class((), data)
    datamodule.setup("validate")
    model_args = (config["model"].get("init_args") or {})
    reward = instantiate_class((), model_args["reward"])
    kwargs = {"max_new_tokens": int(model_args.get("max_new_tokens", 64)),
              "temperature": float(model_args.get("temperature", 1.0)),
              "val_seed": int(model_args.get("val_seed", 1234))}
    results = {}
    for role in ("baseline", "final"):
        name = options[role]
        results[role] = {"stage": name, "checkpoint": str(pipe.output(name)),
                         "answers": answer_heldout(pipe.output(name), datamodule, reward, **kwargs)}
    return {**results, "prompts_from": source, "n": len(results["final"]["answers"]), **kwargs}


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    if (n := len(values)) == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def summarise(answers: Sequence[HeldoutAnswer]) -> dict[str, tuple[float, float]]:
    """Mean and standard error of the reward and each part, overall and by safety tag."""
    out = {"reward": _mean_se([a.reward for a in answers])}
    for key in sorted({k for a in answers for k in a.parts}):
        out[key] = _mean_se([a.parts[key] for a in answers if key in a.parts])
    out["reward (safety prompts)"] = _mean_se([a.reward for a in answers if a.is_safety])
    out["reward (other prompts)"] = _mean_se([a.reward for a in answers if not a.is_safety])
    out["answer length (chars)"] = _mean_se([float(len(a.answer)) for a in answers])
    return out


# ------------------------------------------------------------------------------------------ plots


def _pyplot() -> Any | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def plot_losses(plt: Any, stages: Sequence[tuple[str, list[dict[str, float]]]], path: Path) -> Path | None:
    stages = [(n, r) for n, r in stages if series(r, "train/loss")[0] or series(r, "val/loss")[0]]
    if not stages:
        return None
    fig, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 3.8), squeeze=False)
    for ax, (name, rows) in zip(axes[0], stages):
        for metric, style in (("train/loss", "-"), ("val/loss", "o-")):
            xs, ys = series(rows, metric)
            if xs:
                ax.plot(xs, ys, style, label=metric, markersize=4)
        ax.set_title(f"{name}: loss (nats per token)")
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rm_accuracies(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """The last held-out accuracy overall, per margin label and per source."""
    keys = sorted({k for r in rows for k in r if k == "val/accuracy" or k.startswith("val/accuracy_by_")})
    return {k.removeprefix("val/"): v for k in keys if (v := last_value(rows, k)) is not None}


def plot_reward_models(plt: Any, rms: Sequence[tuple[str, dict[str, float]]], path: Path) -> Path | None:
    if not rms:
        return None
    labels = sorted({k for _, acc in rms for k in acc}, key=lambda k: (k != "accuracy", k))
    width = 0.8 / len(rms)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(labels) + 2), 3.8))
    for j, (name, acc) in enumerate(rms):
        xs = [i + j * width for i in range(len(labels))]
        ax.bar(xs, [acc.get(k, float("nan")) for k in labels], width=width, label=name)
    ax.axhline(0.5, color="black", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks([i + width * (len(rms) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels([k.replace("accuracy_by_", "").replace("accuracy", "all pairs") for k in labels],
                       rotation=20, ha="right")
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("held-out ranking accuracy")
    ax.set_title("Reward models on held-out pairs (per margin label and per source)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rlhf_curves(rl: Sequence[tuple[str, str, list[dict[str, float]]]]) -> list[dict[str, Any]]:
    """Per RLHF stage, its metrics per iteration, on one iteration axis across stages."""
    out, offset = [], 0
    for name, kind, rows in rl:
        per = {m: epoch_series(rows, m) for m in ("train/reward", "train/kl", "val/reward", "val/kl",
                                                  "train/reward_best_of_k", "train/reward_pool")}
        n = 1 + max((e for s in per.values() for e in s), default=-1)
        out.append({"stage": name, "kind": kind, "offset": offset, "iterations": n,
                    **{m: {offset + e + 1: v for e, v in s.items()} for m, s in per.items()}})
        offset += n
    return out


def plot_rlhf(plt: Any, curves: Sequence[dict[str, Any]], path: Path) -> Path | None:
    if not curves:
        return None
    fig, (ax_r, ax_k) = plt.subplots(1, 2, figsize=(11, 3.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, c in enumerate(curves):
        colour = colours[i % len(colours)]
        for metric, ax, style in (("train/reward", ax_r, ".-"), ("val/reward", ax_r, "s"),
                                  ("train/kl", ax_k, ".-"), ("val/kl", ax_k, "s")):
            pts = sorted(c[metric].items())
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=colour, markersize=5,
                        label=f"{c['stage']} {metric.split('/')[0]}")
    ax_r.set_title("reward per iteration (train: rollouts; val: held-out prompts)")
    ax_k.set_title("KL to the stage's reference policy (nats per answer)")
    for ax in (ax_r, ax_k):
        ax.set_xlabel("RLHF iteration (rejection-sampling round or PPO iteration)")
        ax.grid(alpha=0.3)
    ax_r.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_heldout(plt: Any, comparison: dict[str, Any], path: Path) -> Path | None:
    base, final = (summarise(comparison[r]["answers"]) for r in ("baseline", "final"))
    keys = [k for k in ("reward", "reward (safety prompts)", "reward (other prompts)") if k in base]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for j, (label, summary) in enumerate(((comparison["baseline"]["stage"], base), (comparison["final"]["stage"], final))):
        xs = [i + 0.38 * j for i in range(len(keys))]
        ax.bar(xs, [summary[k][0] for k in keys], yerr=[summary[k][1] for k in keys], width=0.38, capsize=3,
               label=label)
    ax.set_xticks([i + 0.19 for i in range(len(keys))])
    ax.set_xticklabels(keys)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel("combined reward (logit of the gated score)")
    ax.set_title(f"The same {comparison['n']} held-out prompts, before and after RLHF (mean +- s.e.)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ markdown


def _cell(text: Any, limit: int = 160) -> str:
    s = str(text).replace("\r", " ").replace("\n", " ").replace("|", "\\|").strip()
    return s if len(s) <= limit else s[: limit - 1] + "…"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _num(v: float | None, fmt: str = ".3f") -> str:  # n/a for missing or NaN
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def write_report(pipe: Pipeline, print_fn: Callable[[str], None] = print) -> Path:
    """Write ``<run_dir>/report.md`` (and PNGs beside it) for the stages that have finished."""
    options = {**REPORT_DEFAULTS, **(pipe.report or {})}
    names = [s.name for s in pipe.stages]
    options["final"] = options["final"] or names[-1]
    out = pipe.run_dir
    out.mkdir(parents=True, exist_ok=True)
    records = {n: json.loads((pipe.stage_dir(n) / MARKER).read_text()) for n in names
               if (pipe.stage_dir(n) / MARKER).is_file()}
    configs = {n: merged_config(pipe, n) for n in names}
    kinds = {n: stage_kind(configs[n]) for n in names}
    metrics = {n: read_metrics(pipe.stage_dir(n)) for n in names}
    plt = _pyplot()
    figures: dict[str, Path | None] = {}

    lines = [f"# Llama 2 recipe: pipeline report ({pipe.run_dir.name})", "",
             f"Pipeline `{pipe.path}`, run directory `{pipe.run_dir}`, written {time.strftime('%Y-%m-%d %H:%M')}. "
             "Every figure and table below is drawn from the values the stages logged (their `csv/` metrics), "
             "except the held-out comparison, which is computed here.", ""]
    total = sum(r["elapsed_s"] for r in records.values())
    lines += ["## Stages", "", md_table(
        ["stage", "kind", "config", "time", "metric", "value", "checkpoint"],
        [[n, kinds[n], f"`{pipe.stage(n).source}`", format_duration(records[n]["elapsed_s"], spaced=True) if n in records else "not run",
          records.get(n, {}).get("metric") or "", _num(records.get(n, {}).get("value"), ".4g"),
          f"`{pipe.output(n)}`"] for n in names]), "", f"Total stage time: {format_duration(total, spaced=True)}.", ""]
    if plt is None:
        lines += ["*Plots skipped: matplotlib is not installed (`pip install llama2-lightning[report]`).*", ""]

    # Pretraining and SFT
    lm = [(n, metrics[n]) for n in names if kinds[n] in ("pretrain", "sft")]
    if lm:
        figures["losses"] = plot_losses(plt, lm, out / "losses.png") if plt else None
        lines += ["## Pretraining and supervised fine-tuning", ""]
        if figures["losses"]:
            lines += ["![loss curves](losses.png)", ""]
        rows = []
        for n, r in lm:
            rows.append([n, _num(series(r, "train/loss")[1][0] if series(r, "train/loss")[1] else None),
                         _num(last_value(r, "train/loss")), _num(last_value(r, "val/loss")),
                         _num(last_value(r, "val/bpb")), _num(last_value(r, "val/acc"))])  # SFTModule's name
        lines += [md_table(["stage", "first train loss", "last train loss", "val loss", "val bits/byte",
                            "val answer-token accuracy"], rows), ""]

    # Reward models
    rms = [(n, rm_accuracies(metrics[n])) for n in names if kinds[n] == "reward"]
    if rms:
        figures["reward_models"] = plot_reward_models(plt, rms, out / "reward_models.png") if plt else None
        lines += ["## Reward models", ""]
        if figures["reward_models"]:
            lines += ["![reward-model accuracy](reward_models.png)", ""]
        cols = sorted({k for _, acc in rms for k in acc}, key=lambda k: (k != "accuracy", k))
        lines += [md_table(["reward model", *[c.replace("accuracy_by_", "").replace("accuracy", "all pairs")
                                              for c in cols]],
                           [[n, *[_num(acc.get(c)) for c in cols]] for n, acc in rms]), "",
                  "Held-out pairs: each source's share set by `val_fraction`, chosen by content, so both reward "
                  "models are evaluated on the same pairs. Chance is 0.5. Anthropic HH pairs carry no rating, so "
                  "every pair has margin label `none` (the margin term is 0). Read each model on its own source "
                  "(helpfulness on `hh_helpful`, safety on `hh_harmless`): on the other's data a model can fall "
                  "below chance, the tension between helpfulness and safety that made the paper train two reward "
                  "models (section 3.2.2).", ""]

    # RLHF
    rl = [(n, kinds[n], metrics[n]) for n in names if kinds[n] in ("ppo", "rejection_sampling")]
    if rl:
        curves = rlhf_curves(rl)
        figures["rlhf"] = plot_rlhf(plt, curves, out / "rlhf.png") if plt else None
        lines += ["## RLHF rounds", ""]
        if figures["rlhf"]:
            lines += ["![reward and KL per iteration](rlhf.png)", ""]
        rows = []
        for c in curves:
            tr, val, kl = c["train/reward"], c["val/reward"], c["val/kl"]
            first_tr = tr[min(tr)] if tr else None
            last_tr = tr[max(tr)] if tr else None
            rows.append([c["stage"], c["kind"], c["iterations"], _num(first_tr), _num(last_tr),
                         _num(val[max(val)] if val else None), _num(kl[max(kl)] if kl else None)])
        lines += [md_table(["stage", "algorithm", "iterations", "rollout reward (first)", "rollout reward (last)",
                            "held-out reward (last)", "held-out KL (last)"], rows), "",
                  "Rewards are the logit of the safety-gated score (section 3.2.3). Each stage's KL is measured "
                  "against that stage's starting policy (its reference), so it restarts near 0 each round.", ""]

    # Held-out comparison
    if options["baseline"] is not None and pipe.output(options["baseline"]).exists() \
            and pipe.output(options["final"]).exists():
        options["prompts_from"] = options["prompts_from"] or options["final"]
        print_fn(f"report: answering held-out prompts with {options['baseline']} and {options['final']} ...")
        comparison = compare_heldout(pipe, options)
        base, final = (summarise(comparison[r]["answers"]) for r in ("baseline", "final"))
        figures["heldout"] = plot_heldout(plt, comparison, out / "heldout.png") if plt else None
        lines += [f"## The same held-out prompts: {options['baseline']} vs {options['final']}", "",
                  f"{comparison['n']} held-out prompts of stage `{comparison['prompts_from']}` (never trained on), "
                  f"each answered once by both policies with the same sampling seed (temperature "
                  f"{comparison['temperature']}, up to {comparison['max_new_tokens']} tokens) and scored by that "
                  "stage's reward function.", ""]
        if figures["heldout"]:
            lines += ["![held-out comparison](heldout.png)", ""]
        lines += [md_table(["mean (± s.e.)", options["baseline"], options["final"]],
                           [[k, f"{base[k][0]:.3f} ± {base[k][1]:.3f}", f"{final[k][0]:.3f} ± {final[k][1]:.3f}"]
                            for k in base]), ""]
        diff = final["reward"][0] - base["reward"][0]
        lb, lf = base["answer length (chars)"][0], final["answer length (chars)"][0]
        lines += [f"Mean combined reward: {base['reward'][0]:.3f} → {final['reward'][0]:.3f} "
                  f"({'+' if diff >= 0 else ''}{diff:.3f}). Mean answer length: {lb:.0f} → {lf:.0f} characters. "
                  "A policy optimised against a reward model learns whatever that model rewards, including its "
                  "blind spots (the paper's reason for early stopping and the KL penalty): read this reward "
                  "next to the reward models' accuracy above and the answers below.", ""]
        rows = []
        for a, b in list(zip(comparison["baseline"]["answers"], comparison["final"]["answers"]))[: options["table_rows"]]:
            rows.append([a.prompt + (" *(safety)*" if a.is_safety else ""), a.answer,
                         _num(a.parts.get("helpful")), _num(a.parts.get("safety")), b.answer,
                         _num(b.parts.get("helpful")), _num(b.parts.get("safety"))])
        lines += [md_table(["prompt", f"{options['baseline']} answer", "R_h", "R_s", f"{options['final']} answer",
                            "R_h", "R_s"], rows), "",
                  "R_h, R_s: the helpfulness and safety reward models' scores (sigmoid). A tiny model trained for "
                  "minutes on Shakespeare and 175 instructions writes mostly noise; what the table shows is how "
                  "the reward models' preferences moved the policy.", ""]
        (out / "heldout.json").write_text(json.dumps({
            role: {"stage": comparison[role]["stage"], "checkpoint": comparison[role]["checkpoint"],
                   "summary": summarise(comparison[role]["answers"]),
                   "answers": [a.__dict__ for a in comparison[role]["answers"]]}
            for role in ("baseline", "final")}, indent=1))

    eval_lines, eval_figures, eval_summary = evaluation_sections(pipe, options, configs, kinds, plt, md_table, print_fn)
    lines += eval_lines
    path = out / "report.md"
    path.write_text("\n".join(lines))
    if options["wandb"] and os.environ.get("WANDB_MODE", "offline") != "disabled":
        _log_to_wandb(pipe, path, {k: v for k, v in {**figures, **eval_figures}.items() if v is not None}, eval_summary)
    return path


def _log_to_wandb(pipe: Pipeline, report: Path, figures: dict[str, Path], evaluation: dict[str, Any]) -> None:
    import wandb

    run = wandb.init(project="llama2-lightning", name=f"{pipe.run_dir.name}-report", job_type="report",
                     dir=str(pipe.run_dir), mode=os.environ.get("WANDB_MODE", "offline"), reinit=True)
    try:
        run.log({f"report/{k}": wandb.Image(str(v)) for k, v in figures.items()})
        heldout = pipe.run_dir / "heldout.json"
        if heldout.is_file():
            data = json.loads(heldout.read_text())
            table = wandb.Table(columns=["policy", "prompt", "is_safety", "answer", "reward", "helpful", "safety"])
            for role, d in data.items():
                for a in d["answers"]:
                    table.add_data(d["stage"], a["prompt"], a["is_safety"], a["answer"], a["reward"],
                                   a["parts"].get("helpful"), a["parts"].get("safety"))
            run.log({"report/heldout_answers": table})
            run.summary.update({f"heldout/{role}/{k}": v[0] for role, d in data.items()
                                for k, v in d["summary"].items()})
        run.summary.update({f"evaluation/{section}/{k}": v for section, d in evaluation.items() for k, v in d.items()})
        run.save(str(report), base_path=str(report.parent), policy="now")
    finally:
        run.finish()


__all__ = ["write_report", "answer_heldout", "compare_heldout", "summarise", "stage_kind", "rm_accuracies", "md_table"]
