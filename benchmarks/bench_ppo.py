"""Figure (d): where a PPO iteration's time goes: generation / scoring / optimisation.

``RLHFModule`` + ``PPOCallback`` with a rule reward (``TokenRuleReward``) on a small
preset with random weights, driven by a Lightning ``Trainer`` on generated prompts. Per iteration the
callback times the rollout (generation) and the reward plus the policy / reference / value forward
passes (scoring); optimisation is the module's PPO minibatch steps. The first iteration is warm-up.
No peer library runs PPO in this environment; the table is the split of our own iteration.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L

from llama2_lightning.callbacks.ppo import PPOCallback
from llama2_lightning.data.prompts import PromptDataModule
from llama2_lightning.modules.args import OptimizerArgs
from llama2_lightning.modules.rlhf import RLHFModule
from llama2_lightning.reward_functions import TokenRuleReward

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import markdown_table, parse_args, print_machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class TimedPPOCallback(PPOCallback):
    """PPOCallback that keeps each iteration's timings: generation and scoring from its experience,
    optimisation from the end of make_experience to the end of the training step."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rows: list[dict[str, float]] = []
        self._start = 0.0

    def make_experience(self, trainer: L.Trainer, module: Any, batch: dict[str, Any]) -> Any:
        exp = super().make_experience(trainer, module, batch)
        self.rows.append({"generation": exp.stats["time/generation_s"], "scoring": exp.stats["time/scoring_s"]})
        self._start = time.perf_counter()
        return exp

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.rows[-1]["optimisation"] = time.perf_counter() - self._start


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", help="policy preset (vocabulary of data/tokenizer.model)")
    p.add_argument("--prompts", type=int, default=16, help="prompts per iteration (rollouts)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--minibatch", type=int, default=8, help="sequences per PPO optimiser step")
    p.add_argument("--iterations", type=int, default=3, help="timed PPO iterations (plus one warm-up)")
    p.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny preset, 4 prompts, 4 tokens, 1 iteration (smoke test)")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(build_parser(), argv, preset="tiny", prompts=4, new_tokens=4, minibatch=4, iterations=1)
    L.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompts.jsonl"
        topics = ["the king", "the sea", "love", "the night", "thy heart", "the war", "a rose", "the moon"]
        path.write_text("".join(json.dumps({"prompt": f"{v} {t}."}) + "\n"
                                for v in ["Tell me of", "Sing of", "Speak of", "Dream of"] for t in topics))
        dm = PromptDataModule(sources=[{"path": str(path), "format": "prompts"}],
                              tokenizer_path=str(ROOT / "data" / "tokenizer.model"), max_prompt_len=32,
                              batch_size=args.prompts, val_fraction=0.125, seed=0)
        module = RLHFModule(model=args.preset, reward=TokenRuleReward(target_ids=list(range(300, 556))),
                            max_new_tokens=args.new_tokens, minibatch_size=args.minibatch,
                            optimizer=OptimizerArgs(name=args.optimizer, lr=1e-5))
        times = TimedPPOCallback(seed=0)
        trainer = L.Trainer(max_epochs=args.iterations + 1, accelerator="cpu", devices=1,
                            callbacks=[times], logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0, default_root_dir=tmp)
        trainer.fit(module, dm)
    print_machine(module.model, args.preset)
    timed = times.rows[1:] or times.rows  # the first iteration warms up (allocations, thread pool)
    stages = ["generation", "scoring", "optimisation"]
    med = {s: statistics.median(r[s] for r in timed) for s in stages}
    total = sum(med.values())
    rows = [[s, f"{med[s]:.3f}", f"{med[s] / total:.0%}"] for s in stages] + [["total", f"{total:.3f}", "100%"]]
    print(f"PPO iteration: {args.prompts} prompts, {args.new_tokens} new tokens, minibatch {args.minibatch}, "
          f"optimizer {args.optimizer}; median of {len(timed)} iteration(s)")
    table = markdown_table(["stage", "seconds", "share"], rows)
    print(f"\n{table}")
    return {"table": table, "seconds": med, "iterations": times.rows}


if __name__ == "__main__":
    main()
