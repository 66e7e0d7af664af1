"""One rank of the held-out decoding test under tensor parallelism (``tests/test_tensor_parallel.py``),
launched by ``torch.distributed.run`` on CPU with gloo: a tiny policy split 2 ways answers through every
path that decodes outside the PPO rollouts (``RLHFModule.validation_step`` under ``Trainer.validate``
with Lightning's ``ModelParallelStrategy``, the pipeline report's ``answer_heldout``, ``ChatSamples`` and
``GenerationSamples``), greedily, and writes the token ids and texts for the test to compare with the
unsharded model. It also records the width of ``wq``'s weight in every decoding forward: the TP shard
(half the heads), never the gathered matrix.

    python -m torch.distributed.run --nproc-per-node=2 tests/tp_heldout_worker.py WORK_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor

from llama2_lightning.callbacks.chat_samples import ChatSamples
from llama2_lightning.callbacks.samples import GenerationSamples
from llama2_lightning.data.prompts import PromptDataModule
from llama2_lightning.modules.rlhf import RLHFModule
from llama2_lightning.pipeline.report import answer_heldout
from llama2_lightning.reward_functions import TokenRuleReward

NEW_TOKENS = 6
CHAT_PROMPTS = ["Tell me of the sea.", "What is love?"]
TEXT_PROMPTS = ["ROMEO:", "First Citizen:\n"]


def prompt_data(work: Path, tokenizer: str) -> PromptDataModule:
    return PromptDataModule(sources=[{"path": str(work / "prompts.jsonl"), "format": "prompts"}],
                            tokenizer_path=tokenizer, max_prompt_len=32, batch_size=4, val_fraction=0.5,
                            val_batch_size=3, seed=0)


def main(work: Path, tokenizer: str) -> None:
    module = RLHFModule(init_from=str(work / "policy.ckpt"), reward=TokenRuleReward(targets=["the", "of"]),
                        max_new_tokens=NEW_TOKENS, temperature=0.0, minibatch_size=4)
    rollouts: list[dict] = []
    rollout = module.rollout

    def recorded(batch, seed, **kwargs):  # noqa: ANN001, ANN202 - the module's own rollout, recorded
        out = rollout(batch, seed, **kwargs)
        rollouts.append({"prompt_ids": out.prompt_ids, "answer_ids": out.answer_ids})
        return out

    module.rollout = recorded
    widths: set[int] = set()

    class WqWidth(L.Callback):
        """Records the rows of ``wq``'s weight that each forward of the policy computes with."""

        def on_validation_start(self, trainer: L.Trainer, pl_module: RLHFModule) -> None:
            def record(mod: torch.nn.Module, args: object) -> None:
                w = mod.weight
                widths.add((w.to_local() if isinstance(w, DTensor) else w).shape[0])
            pl_module.model.layers[0].attention.wq.register_forward_pre_hook(record)

    trainer = L.Trainer(accelerator="cpu", devices=2, num_nodes=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[WqWidth()],
                        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2))
    data = prompt_data(work, tokenizer)
    trainer.validate(module, datamodule=data)
    out = {"validation": rollouts, "rank": trainer.global_rank,
           "tp_rank": trainer.strategy.device_mesh["tensor_parallel"].get_local_rank()}
    out["report"] = [a.answer for a in answer_heldout(work / "policy.ckpt", data, TokenRuleReward(targets=["the"]),
                                                      NEW_TOKENS, temperature=0.0,
                                                      device_mesh=trainer.strategy.device_mesh)]
    out["chat"] = ChatSamples(CHAT_PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0.0,
                              print_samples=False).log_samples(trainer, module)
    out["generation"] = GenerationSamples(TEXT_PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0.0,
                                          print_samples=False).log_samples(trainer, module)
    out["wq_widths"] = sorted(widths)
    (work / f"rank{trainer.global_rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]), sys.argv[2])
