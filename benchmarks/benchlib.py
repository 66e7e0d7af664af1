"""Helpers shared by the benchmark scripts: the same weights in ours and transformers' Llama,
interleaved timing, the machine description and markdown tables.

Each ``bench_*.py`` script puts this folder on ``sys.path`` and imports from here, so the scripts run
as plain files (``python benchmarks/bench_train.py``) and load in tests through importlib.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from llama2_lightning.config import LlamaConfig
from llama2_lightning.generation import generate
from llama2_lightning.model import Transformer

LOGITS_TOLERANCE = 1e-3


# ---------------------------------------------------------------------------------------------- weights
def _rotary_meta_to_hf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved RoPE pairs -> Hugging Face's half-split layout, rows permuted per head."""
    out_features, dim = weight.shape
    head_dim = out_features // n_heads
    return weight.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(out_features, dim)


def to_hf_state_dict(config: LlamaConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (Meta) parameter names and layout -> ``LlamaForCausalLM``'s."""
    simple = {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    in_layer = {
        "attention.wq.weight": "self_attn.q_proj.weight",
        "attention.wk.weight": "self_attn.k_proj.weight",
        "attention.wv.weight": "self_attn.v_proj.weight",
        "attention.wo.weight": "self_attn.o_proj.weight",
        "feed_forward.w1.weight": "mlp.gate_proj.weight",
        "feed_forward.w2.weight": "mlp.down_proj.weight",
        "feed_forward.w3.weight": "mlp.up_proj.weight",
        "attention_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
    }
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name in simple:
            out[simple[name]] = tensor
            continue
        prefix, index, rest = name.split(".", 2)
        if prefix != "layers" or rest not in in_layer:
            raise KeyError(f"no Hugging Face name for parameter {name!r}")
        if rest == "attention.wq.weight":
            tensor = _rotary_meta_to_hf(tensor, config.n_heads)
        elif rest == "attention.wk.weight":
            tensor = _rotary_meta_to_hf(tensor, config.n_kv_heads)
        out[f"model.layers.{index}.{in_layer[rest]}"] = tensor
    return out


def build_models(preset: str | LlamaConfig, seed: int = 0,
                 device: torch.device | str = "cpu") -> tuple[Transformer, torch.nn.Module]:
    """Ours with a fixed seed, and transformers' LlamaForCausalLM (sdpa, fp32) holding the same weights,
    both built on ``device``. ``preset``: a preset name or a config."""
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig.from_name(preset) if isinstance(preset, str) else preset
    with torch.device(device):
        ours = Transformer(config).float()
    hf_fields = config.to_hf_config()
    for key in ("architectures", "model_type", "torch_dtype"):
        hf_fields.pop(key, None)
    hf_config = HFLlamaConfig(**hf_fields, use_cache=True, attn_implementation="sdpa")
    with torch.device(device):
        theirs = LlamaForCausalLM(hf_config).float()
    missing, unexpected = theirs.load_state_dict(to_hf_state_dict(config, ours.state_dict()), strict=False)
    # rotary inv_freq is a non-persistent buffer; nothing else may be left over
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"weight copy failed: missing {missing}, unexpected {unexpected}")
    attn = getattr(theirs.config, "_attn_implementation", None)
    if attn != "sdpa":
        raise RuntimeError(f"transformers model uses attn_implementation={attn!r}, expected 'sdpa'")
    return ours, theirs


def next_token_batch(vocab_size: int, batch: int, seq_len: int,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (no special tokens) as a language-model batch: inputs and next-token targets, (B, T) each."""
    data = torch.randint(3, vocab_size, (batch, seq_len + 1), generator=generator)  # (B, T + 1)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


@torch.no_grad()
def logits_max_diff(ours: Transformer, theirs: torch.nn.Module, batch: int, seq_len: int, seed: int = 1) -> float:
    ours.eval()
    theirs.eval()
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, ours.config.vocab_size, (batch, seq_len), generator=g).to(ours.output.weight.device)
    a = ours(tokens)
    b = theirs(input_ids=tokens, use_cache=False).logits
    return float((a - b).abs().max())


# ---------------------------------------------------------------------------------------------- workloads
def train_step_ours(model: Transformer, x: torch.Tensor, y: torch.Tensor) -> float:
    logits = model(x)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
    loss.backward()
    model.zero_grad(set_to_none=True)
    return float(loss.detach())


def train_step_theirs(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    logits = model(input_ids=x, use_cache=False).logits
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
    loss.backward()
    model.zero_grad(set_to_none=True)
    return float(loss.detach())


def generate_ours(model: Transformer, prompts: torch.Tensor, new_tokens: int, compile: bool = False) -> torch.Tensor:
    out = generate(model, prompts.tolist(), max_new_tokens=new_tokens, temperature=0.0, eos_id=None, compile=compile)
    return out.tokens


def generate_theirs(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    from transformers import GenerationConfig

    # eos_token_id=None: no EOS stopping and no EOS-suppressing processor, so the output is plain
    # argmax decoding of exactly new_tokens tokens, like ours with eos_id=None.
    gen_config = GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
        bos_token_id=None, pad_token_id=0, use_cache=True,
    )
    out = model.generate(
        input_ids=prompts, attention_mask=torch.ones_like(prompts), generation_config=gen_config
    )
    return out[:, prompts.size(1):]


# ---------------------------------------------------------------------------------------------- timing
@dataclass
class Measurement:
    name: str
    tokens: int  # tokens processed per call
    ours_s: list[float] = field(default_factory=list)
    theirs_s: list[float] = field(default_factory=list)

    @property
    def ours_tok_s(self) -> float:
        return self.tokens / statistics.median(self.ours_s)

    @property
    def theirs_tok_s(self) -> float:
        return self.tokens / statistics.median(self.theirs_s)

    @property
    def ratio(self) -> float:
        return self.ours_tok_s / self.theirs_tok_s

    @property
    def best_ratio(self) -> float:
        """Ratio of the fastest repetitions: the least disturbed by other load on the machine."""
        return min(self.theirs_s) / min(self.ours_s)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def _timed(fn: Callable[[], Any], clock: Callable[[], float] = time.perf_counter) -> tuple[float, Any]:
    start = clock()
    result = fn()
    return clock() - start, result


def interleaved(m: Measurement, ours: Callable[[], Any], theirs: Callable[[], Any], repeats: int,
                warmup: int = 1, log: Callable[[str], None] = print,
                clock: Callable[[], float] = time.perf_counter) -> tuple[Any, Any]:
    """Alternate ours/theirs (order flipped every repetition) after ``warmup`` untimed calls of each."""
    r_ours = r_theirs = None
    for _ in range(warmup):
        r_ours, r_theirs = ours(), theirs()
    for i in range(repeats):
        order = [("ours", ours), ("theirs", theirs)]
        if i % 2:
            order.reverse()
        for who, fn in order:
            dt, result = _timed(fn, clock)
            if who == "ours":
                m.ours_s.append(dt)
                r_ours = result
            else:
                m.theirs_s.append(dt)
                r_theirs = result
        log(f"  {m.name} rep {i + 1}/{repeats}: ours {m.ours_s[-1]:.3f}s, theirs {m.theirs_s[-1]:.3f}s")
    return r_ours, r_theirs


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def gemm_seconds(fn: Callable[[], Any]) -> tuple[float, float]:
    """One profiled call of ``fn``: (seconds in GEMM kernels, seconds in all operators), self CPU times.
    The profiler's overhead lands in the second number, so a GEMM share read from it is a lower bound."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS)
    total = sum(e.self_cpu_time_total for e in events)
    return gemm / 1e6, total / 1e6


# ---------------------------------------------------------------------------------------------- report
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unavailable"


def format_table(measurements: Sequence[Measurement], ours: str = "ours", theirs: str = "transformers") -> str:
    """One row per measurement: median tokens/s of both sides and their ratio."""
    lines = [
        f"| measurement | {ours} tok/s | {theirs} tok/s | ours/theirs |",
        "|---|---:|---:|---:|",
    ]
    for m in measurements:
        lines.append(f"| {m.name} | {m.ours_tok_s:.1f} | {m.theirs_tok_s:.1f} | {m.ratio:.2f} |")
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A markdown table; ``align`` one character per column, ``l`` or ``r`` (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def training_shape_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--preset/--batch/--seq-len of a timed training step (the same defaults in every training script)."""
    p.add_argument("--preset", default="llama-100m", help="LlamaConfig preset (default: llama-100m, ~125M, GQA)")
    p.add_argument("--batch", type=int, default=4, help="training batch size")
    p.add_argument("--seq-len", type=int, default=256, help="training sequence length")
    return p


def common_arguments(p: argparse.ArgumentParser, repeats: int = 3) -> argparse.ArgumentParser:
    """--repeats/--warmup/--threads/--clock/--seed, shared by every script."""
    p.add_argument("--repeats", type=int, default=repeats, help="timed repetitions per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per side before timing")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall: elapsed time (default). cpu: this process's CPU time (meaningful with --threads 1)")
    p.add_argument("--seed", type=int, default=0)
    return p


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None, **quick: Any) -> argparse.Namespace:
    """Parse ``argv``; with ``--quick`` (every script has it) set ``quick``'s values instead of the
    defaults, and apply ``--threads`` where the script has it."""
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in quick.items():
            setattr(args, name, value)
    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)
    return args


def print_machine(model: Transformer | None = None, name: str = "") -> None:
    """Versions, threads, CPU and load: the context every table needs."""
    try:
        import transformers

        tf = f", transformers {transformers.__version__}"
    except ImportError:
        tf = ""
    print(f"torch {torch.__version__}{tf}, threads {torch.get_num_threads()}")
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs), load average: {load_average()}")
    if model is not None:
        c = model.config
        print(f"preset {name}: {model.num_parameters() / 1e6:.1f}M parameters, dim {c.dim}, {c.n_layers} layers, "
              f"{c.n_heads} heads / {c.n_kv_heads} KV heads, vocab {c.vocab_size}")


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)
