"""Figure (f): memory per stage, as tensor bytes, for fp32 vs 8-bit AdamW and fp32 / bf16 / int8 frozen models.

What is counted (CPU has no allocator statistics, and resident-set deltas mix in the allocator's
caching and the Python heap, so this counts tensors, each one measured, not estimated):

* weights and gradients: ``numel x element size`` of the parameters;
* optimiser state: the bytes of every tensor in ``optimizer.state`` after one real ``step()``
  (``torch.optim.AdamW`` vs bitsandbytes ``AdamW8bit``, which keeps tensors under 4,096 elements in
  32 bits);
* activations: the distinct storages autograd saves for backward during one real training forward
  + loss of a (batch, seq_len) batch (``torch.autograd.graph.saved_tensors_hooks``; logits included);
* frozen models (RLHF reference, reward models): parameter and buffer bytes in fp32, bf16 and
  bitsandbytes LLM.int8 (``rewards.quantize_linear_8bit``; the reward head stays floating point).

A stage's total is the sum of what it holds at its peak (during backward). The process's peak RSS is
printed as a cross-check.
"""

from __future__ import annotations

import argparse
import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import markdown_table, parse_args  # noqa: E402

from llama2_lightning.model import Transformer  # noqa: E402
from llama2_lightning.optim import build_optimizer, param_groups  # noqa: E402
from llama2_lightning.scalar_model import ScalarModel  # noqa: E402

MB = 2**20


def tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def module_bytes(module: nn.Module) -> int:
    return tensor_bytes(module.parameters()) + tensor_bytes(module.buffers())


def optimizer_state_bytes(model: nn.Module, name: str) -> int:
    """Bytes of the optimiser's state after one step with random gradients."""
    opt = build_optimizer(param_groups(model, 0.1), name, 1e-5, (0.9, 0.95), 1e-5)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    state = opt.state
    model.zero_grad(set_to_none=True)
    size = sum(t.numel() * t.element_size() for s in state.values() for t in s.values() if torch.is_tensor(t))
    del opt
    return size


def activation_bytes(model: Transformer, batch: int, seq_len: int) -> int:
    """Distinct storages saved for backward by one training forward + cross-entropy."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return t

    tokens = torch.randint(3, model.config.vocab_size, (batch, seq_len + 1))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    del loss, logits
    return sum(n for ptr, n in storages.items() if ptr not in params)


def frozen_bytes(model: Transformer) -> dict[str, int]:
    """A frozen reward model (trunk + scalar head) built from ``model``'s weights in each format."""
    from llama2_lightning.reward_functions import quantize_linear_8bit

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rm = ScalarModel.from_transformer(Transformer(model.config), drop_lm_head=True).to(dtype)
        out[name] = module_bytes(rm)
    try:
        rm = ScalarModel.from_transformer(Transformer(model.config), drop_lm_head=True).requires_grad_(False)
        quantize_linear_8bit(rm.trunk, skip=("output",))
        out["int8"] = module_bytes(rm)
    except ImportError:
        out["int8"] = -1
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="tiny,llama-100m", help="comma-separated LlamaConfig presets")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--quick", action="store_true", help="tiny preset only, batch 2 x 16 (smoke test)")
    return p


def measure(preset: str, batch: int, seq_len: int) -> dict[str, int]:
    torch.manual_seed(0)
    model = Transformer.from_name(preset).float()
    weights = tensor_bytes(model.parameters())
    m = {"weights": weights, "grads": weights, "adamw": optimizer_state_bytes(model, "adamw")}
    try:
        m["adamw8bit"] = optimizer_state_bytes(model, "adamw8bit")
    except ImportError:
        m["adamw8bit"] = -1
    m["activations"] = activation_bytes(model, batch, seq_len)
    m["rm_activations"] = activation_bytes(model, 2 * batch, seq_len)  # chosen + rejected, one forward
    frozen = frozen_bytes(model)
    m.update({f"frozen_{k}": v for k, v in frozen.items()})
    return m


def stage_rows(preset: str, m: dict[str, int]) -> list[list[str]]:
    def mb(x: int) -> str:
        return f"{x / MB:,.1f}" if x >= 0 else "n/a"

    trainable = m["weights"] + m["grads"]
    rows = []
    for opt in ("adamw", "adamw8bit"):
        lm = trainable + m[opt] + m["activations"]
        rm = trainable + m[opt] + m["rm_activations"]
        # PPO: policy and value model trained (value ~ policy size), the reference frozen in fp32,
        # two frozen reward models (helpful, safety) as in the paper.
        ppo = 2 * (trainable + m[opt] + m["activations"]) + m["weights"] + 2 * m["frozen_fp32"]
        ppo_lean = 2 * (trainable + m[opt] + m["activations"]) + m["weights"] // 2 + 2 * m["frozen_int8"]
        rows += [
            [preset, f"pretrain / SFT step, {opt}", mb(m["weights"]), mb(m["grads"]), mb(m[opt]), mb(m["activations"]),
             "-", mb(lm)],
            [preset, f"reward-model step (chosen + rejected), {opt}", mb(m["weights"]), mb(m["grads"]), mb(m[opt]),
             mb(m["rm_activations"]), "-", mb(rm)],
            [preset, f"PPO step, {opt}, fp32 reference + 2 fp32 RMs", mb(2 * m["weights"]), mb(2 * m["grads"]),
             mb(2 * m[opt]), mb(2 * m["activations"]), mb(m["weights"] + 2 * m["frozen_fp32"]), mb(ppo)],
            [preset, f"PPO step, {opt}, bf16 reference + 2 int8 RMs", mb(2 * m["weights"]), mb(2 * m["grads"]),
             mb(2 * m[opt]), mb(2 * m["activations"]), mb(m["weights"] // 2 + 2 * m["frozen_int8"]), mb(ppo_lean)],
        ]
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(build_parser(), argv, presets="tiny", batch=2, seq_len=16)
    presets = [p.strip() for p in args.presets.split(",")]
    results = {p: measure(p, args.batch, args.seq_len) for p in presets}
    rows, opt_rows, frozen_rows = [], [], []
    for preset, m in results.items():
        rows += stage_rows(preset, m)
        saving = m["adamw"] / m["adamw8bit"] if m["adamw8bit"] > 0 else float("nan")
        opt_rows.append([preset, f"{m['adamw'] / MB:,.1f}", f"{m['adamw8bit'] / MB:,.1f}", f"{saving:.2f}x"])
        frozen_rows.append([preset, *(f"{m[f'frozen_{k}'] / MB:,.1f}" for k in ("fp32", "bf16", "int8")),
                            f"{m['frozen_fp32'] / m['frozen_int8']:.2f}x" if m["frozen_int8"] > 0 else "n/a"])
    opt_table = markdown_table(["preset", "AdamW state MiB", "AdamW8bit state MiB", "saving"], opt_rows)
    frozen_table = markdown_table(["preset", "frozen RM fp32 MiB", "bf16 MiB", "int8 MiB", "fp32/int8"],
                                  frozen_rows)
    stage_table = markdown_table(["preset", "stage", "weights MiB", "grads MiB", "optimiser MiB",
                                  "activations MiB", "frozen MiB", "total MiB"], rows, align="llrrrrrr")
    print(f"batch {args.batch} x seq {args.seq_len}, fp32 weights (tensor bytes; see the module docstring)\n")
    print(f"{opt_table}\n\n{frozen_table}\n\n{stage_table}")
    print(f"\nprocess peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")
    return {"optimizer_table": opt_table, "frozen_table": frozen_table, "stage_table": stage_table,
            "results": results}


if __name__ == "__main__":
    main()
