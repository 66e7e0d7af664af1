"""Per-rank GPU memory of a training config, from its exact sharding plan over a simulated cluster.

Every model the stage holds (policy, value model, reference, reward models) is built on the meta device
and laid out with the function the training modules call (:func:`llama2_lightning.distributed.
shard_for_training`: the tensor-parallel plan, then FSDP2) over Lightning's own (data_parallel,
tensor_parallel) device mesh of N ranks, made of torch's fake process group: no process, no storage, but
each parameter's local shard has the shape rank 0 would hold. Bytes are counted from those shards, and
FSDP2's gathered units from the same DTensors with their data-parallel placement replicated
(:func:`llama2_lightning.distributed.gathered_numel`: under TP a unit gathers only its TP shard). What
is not a tensor (activations, the KV cache) is estimated from the shapes the config gives, divided
where tensor parallelism splits them, and each estimate says how (``Estimate.notes``).

Peak = what persists (master weights, gradients, optimiser state, frozen models) + the larger of the
two transient phases: training (FSDP2's gathered units + activations) and generation (a gathered policy
when :func:`llama2_lightning.distributed.fits_gathered` lets it gather, plus the KV cache).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.strategies.model_parallel import _setup_device_mesh

from llama2_lightning.config import LlamaConfig
from llama2_lightning.distributed import GATHER_FRACTION, fits_gathered, gathered_numel, local_numel, shard_for_training
from llama2_lightning.dtypes import resolve_dtype
from llama2_lightning.model import Transformer
from llama2_lightning.scalar_model import ScalarModel

GIB = 1024**3
# bitsandbytes' 8-bit AdamW: two uint8 states per element plus one float32 absmax per block of 256 per state
ADAM8BIT_BLOCK = 256


@dataclass
class ModelSpec:
    """One model a stage holds: ``scalar`` for trunk + scalar head (reward and value models)."""

    name: str
    config: LlamaConfig
    trainable: bool
    dtype: torch.dtype
    scalar: bool = False
    int8: bool = False


@dataclass
class StagePlan:
    """What a config asks of each rank, read from its YAML (:func:`plan_from_config`)."""

    stage: str
    world_size: int
    models: list[ModelSpec]
    compute_dtype: torch.dtype
    optimizer: str
    train_rows: int
    """sequences per forward/backward on one rank (an RM pair counts two)"""
    train_seq: int
    activation_checkpointing: bool
    generation_rows: int = 0
    """sequences decoded at once on one rank (RLHF rollouts, sample callbacks); 0: no generation"""
    generation_seq: int = 0
    tensor_parallel_size: int = 1
    """the strategy's ``tensor_parallel_size``; ``world_size / tensor_parallel_size`` data-parallel replicas"""
    sharded_loss: bool = False
    """the loss reads vocabulary-sharded logits (pretraining, SFT: ``loss_parallel``); RLHF gathers them"""
    notes: list[str] = field(default_factory=list)

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.tensor_parallel_size


@dataclass
class Estimate:
    components: dict[str, int]
    """bytes per rank of each part"""
    total: int
    gpu_bytes: int | None
    models: dict[str, dict[str, int]]
    notes: list[str]

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_bytes is None else self.total <= self.gpu_bytes

    def over(self) -> str | None:
        """Which component makes the config not fit: the largest one (the first to shrink)."""
        if self.fits is not False:
            return None
        name = max(self.components, key=self.components.__getitem__)
        return (f"does not fit: {self.total / GIB:.1f} GiB > {self.gpu_bytes / GIB:.1f} GiB; the largest "
                f"component is {name} ({self.components[name] / GIB:.1f} GiB)")


# ------------------------------------------------------------------------------------------ the config
def _model_config(init_args: Mapping[str, Any], key: str = "model") -> LlamaConfig:
    model = init_args.get(key)
    overrides = dict(init_args.get("model_overrides") or {})
    if isinstance(model, str):
        return LlamaConfig.from_name(model, **overrides)
    if isinstance(model, Mapping):
        return LlamaConfig.from_dict({**model, **overrides})
    raise ValueError(f"model.init_args.{key}: give a preset name or a LlamaConfig dict (the memory command does "
                     "not read init_from's checkpoint)")


def _master_dtype(precision: Any) -> torch.dtype:
    text = str(precision or "32-true")
    return {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(text, torch.float32)


def _dtype(name: str | None, default: torch.dtype) -> torch.dtype:
    return resolve_dtype(name) or default


def parallel_layout(config: Mapping[str, Any], world_size: int | None = None) -> tuple[int, int]:
    """(world size, tensor-parallel size) of a config's ``ModelParallelStrategy``, as Lightning resolves
    them (``"auto"``: data parallel over the nodes, tensor parallel over a node's devices). ``world_size``
    given: that many ranks, the config's TP size kept and the data-parallel size made to fit."""
    trainer = config.get("trainer") or {}
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    devices, nodes = (devices if isinstance(devices, int) else 1), (nodes if isinstance(nodes, int) else 1)
    strategy = trainer.get("strategy")
    where = "trainer.strategy.init_args"
    if isinstance(strategy, Mapping) and str(strategy.get("class_path", "")).endswith("ModelParallelStrategy"):
        init = dict(strategy.get("init_args") or {})
        dp, tp = init.get("data_parallel_size", "auto"), init.get("tensor_parallel_size", "auto")
        dp, tp = (nodes if dp == "auto" else dp), (devices if tp == "auto" else tp)
    else:  # another strategy: no tensor parallelism, every process a data-parallel rank
        dp, tp = devices * nodes, 1
    for key, value in (("data_parallel_size", dp), ("tensor_parallel_size", tp)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}.{key}={value!r}: expected a positive integer or 'auto'")
    world = dp * tp if world_size is None else world_size
    if world < 1 or world % tp != 0:
        raise ValueError(f"--world-size {world} is not a multiple of {where}.tensor_parallel_size={tp}: the "
                         "ranks form data-parallel replicas of one tensor-parallel group each")
    return world, tp


def plan_from_config(config: Mapping[str, Any], world_size: int, tensor_parallel_size: int = 1) -> StagePlan:
    """The per-rank plan of a LightningCLI YAML (as a dict): which models, in which dtypes, how many rows,
    over ``world_size`` ranks of which each ``tensor_parallel_size`` form a tensor-parallel group."""
    model = config.get("model") or {}
    cls = str(model.get("class_path", ""))
    args = dict(model.get("init_args") or {})
    data = dict((config.get("data") or {}).get("init_args") or {})
    trainer = config.get("trainer") or {}
    callbacks = trainer.get("callbacks") or []
    master = _master_dtype(trainer.get("precision"))
    sharding, optim = dict(args.get("sharding") or {}), dict(args.get("optimizer") or {})  # the modules' groups
    compute = _dtype(sharding.get("param_dtype"), master)
    cfg = _model_config(args)
    ckpt = bool(sharding.get("activation_checkpointing", False))
    optimizer = str(optim.get("name", "adamw"))
    seq = int(data.get("max_seq_len") or cfg.max_seq_len)
    rows = int(data.get("batch_size", 1))
    plan = StagePlan("", world_size, [], compute, optimizer, rows, seq, ckpt, tensor_parallel_size=tensor_parallel_size)
    samples = [c for c in callbacks if str(c.get("class_path", "")).rsplit(".", 1)[-1]
               in ("ChatSamples", "GenerationSamples")]
    if samples:  # these callbacks decode a few prompts on every rank
        new = int((samples[0].get("init_args") or {}).get("max_new_tokens", 64))
        plan.generation_rows, plan.generation_seq = 1, min(cfg.max_seq_len, 256 + new)
        plan.notes.append(f"{samples[0]['class_path'].rsplit('.', 1)[-1]}: one prompt of <= 256 tokens + {new} new")
    if cls.endswith("PretrainModule"):
        plan.stage, plan.sharded_loss = "pretrain", True
        plan.models.append(ModelSpec("model", cfg, True, master))
    elif cls.endswith("SFTModule"):
        plan.stage, plan.sharded_loss = "sft", True
        plan.models.append(ModelSpec("model", cfg, True, master))
    elif cls.endswith("RewardModule"):
        plan.stage = "reward"
        plan.train_rows = 2 * rows  # chosen and rejected of each pair
        plan.models.append(ModelSpec("model", cfg, True, master, scalar=True))
    elif cls.endswith("RLHFModule"):
        _rlhf_plan(plan, cfg, args, data, callbacks, master)
    else:
        raise ValueError(f"model.class_path {cls!r}: expected one of PretrainModule, SFTModule, RewardModule, "
                         "RLHFModule")
    return plan


def _rlhf_plan(plan: StagePlan, cfg: LlamaConfig, args: dict[str, Any], data: dict[str, Any],
               callbacks: list[Any], master: torch.dtype) -> None:
    # the experience callback decides the algorithm
    ppo = any(str(c.get("class_path", "")).endswith("PPOCallback") for c in callbacks)
    algorithm = "ppo" if ppo else "rejection_sampling"
    plan.stage = f"rlhf-{algorithm}"
    plan.models.append(ModelSpec("policy", cfg, True, master))
    if algorithm == "ppo":
        plan.models.append(ModelSpec("value", cfg, True, master, scalar=True))
    plan.models.append(ModelSpec("reference", cfg, False, _dtype(args.get("frozen_dtype"), master)))
    reward = args.get("reward") or {}
    rargs = dict(reward.get("init_args") or {})
    for key in ("helpful_checkpoint", "safety_checkpoint", "checkpoint"):
        if key in rargs:
            int8 = bool(rargs.get("load_in_8bit", False))
            rm_cfg = _model_config(rargs, "model") if "model" in rargs else cfg
            plan.models.append(ModelSpec(f"rm_{key.split('_')[0]}", rm_cfg, False,
                                         _dtype(rargs.get("frozen_dtype"), master), scalar=True, int8=int8))
    if len(plan.models) > (3 if algorithm == "ppo" else 2):
        plan.notes.append("reward models: assumed to share the policy's architecture (7B/13B/70B RMs as in the paper)")
    k = 1
    for c in callbacks:
        if str(c.get("class_path", "")).endswith("RejectionSamplingCallback"):
            k = int((c.get("init_args") or {}).get("num_samples", 1))
    # the ranks of a tensor-parallel group decode the same prompts together: one share per replica
    prompts_per_rank = max(1, math.ceil(int(data.get("batch_size", 1)) / plan.data_parallel_size))
    chunk = args.get("rollout_batch_size")
    # as RLHFModule decodes: rollout_batch_size rows rounded down to whole prompts of K rows, at least one
    prompts_at_once = prompts_per_rank if chunk is None else min(prompts_per_rank, max(1, int(chunk) // k))
    plan.generation_rows = prompts_at_once * k
    plan.generation_seq = int(data.get("max_prompt_len", 1024)) + int(args.get("max_new_tokens", 64))
    plan.notes.append(f"rollout: {prompts_per_rank} prompts per replica x K={k}, decoded {plan.generation_rows} "
                      f"rows at a time" + (" (set model.init_args.rollout_batch_size to bound it)"
                                          if chunk is None else ""))
    micro = args.get("micro_batch_size") or args.get("minibatch_size", 1)
    plan.train_rows, plan.train_seq = int(micro), plan.generation_seq


# ------------------------------------------------------------------------------------- simulated world
@contextlib.contextmanager
def fake_world(world_size: int, tensor_parallel_size: int = 1) -> Iterator[Any]:
    """Lightning's (data_parallel, tensor_parallel) device mesh of ``world_size`` ranks
    (``ModelParallelStrategy``'s own constructor), over torch's fake process group (this process is rank 0)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("the memory estimate needs its own (fake) process group; one is already initialised")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield _setup_device_mesh(world_size // tensor_parallel_size, tensor_parallel_size, world_size,
                                 torch.device("cpu"))
    finally:
        dist.destroy_process_group()


@dataclass
class ShardedModel:
    """Sizes of one model laid out as training lays it out (elements)."""

    numel: int
    local: int
    """held by rank 0 (its FSDP2 slice of its TP shard)"""
    block: int
    """one block gathered by FSDP2: the whole block without TP, rank 0's TP shard of it with TP"""
    root: int
    """the root unit gathered (embeddings, final norm, output or head)"""
    gathered: int
    """the whole model gathered over the data-parallel dimension (what ``gathered()`` allocates)"""


def shard_on_meta(spec: ModelSpec, mesh: Any, compute_dtype: torch.dtype | None) -> ShardedModel:
    """Build ``spec`` on meta and lay it out as training does (:func:`shard_for_training`)."""
    with torch.device("meta"):
        trunk = Transformer(spec.config)
        model: torch.nn.Module = ScalarModel.from_transformer(trunk) if spec.scalar else trunk
    numel = sum(p.numel() for p in model.parameters())
    if spec.int8:  # bitsandbytes int8 layers are neither split nor sharded: every rank holds all of it
        block = sum(p.numel() for p in trunk.layers[0].parameters()) if len(trunk.layers) else 0
        return ShardedModel(numel, numel, block, numel - block * len(trunk.layers), numel)
    dtype_name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[compute_dtype] \
        if spec.trainable and compute_dtype is not None else None
    shard_for_training(model, mesh, dtype_name, "float32" if spec.trainable else None)
    gathered = gathered_numel(model)
    block = gathered_numel(trunk.layers[0]) if len(trunk.layers) else 0
    return ShardedModel(numel, local_numel(model), block, gathered - block * len(trunk.layers), gathered)


# ------------------------------------------------------------------------------------------ estimate
def block_activation_bytes(config: LlamaConfig, tokens: int, dtype_bytes: int, tensor_parallel_size: int = 1) -> int:
    """Tensors one block saves for backward, per token: its input, both norms' outputs, q/k/v, the
    attention output (SDPA keeps no T x T matrix, only a per-row log-sum-exp), ``wo``'s output, the
    residual, and the feed-forward's w1, w3, silu and product outputs.

    Under tensor parallelism the residual-stream tensors (input, norms, ``wo``'s all-reduced output,
    residual: 5 x dim) are whole on every rank of the group (no sequence parallelism), while those
    inside the split (q, the attention output, k/v: this rank's heads; the feed-forward's: its share
    of the width) are 1/tp of it."""
    C, H = config.dim, config.hidden_dim or 4 * config.dim
    kv = 2 * config.n_kv_heads * config.head_dim
    per_token = 5 * C + (2 * C + kv + 4 * H) // tensor_parallel_size
    return tokens * per_token * dtype_bytes


def estimate(plan: StagePlan, gpu_gib: float | None = None) -> Estimate:
    """Bytes per rank of each component of ``plan`` on a simulated world of ``plan.world_size`` ranks."""
    cb = torch.empty(0, dtype=plan.compute_dtype).element_size()
    comp = dict.fromkeys(("params", "grads", "optimizer_state", "frozen_models", "fsdp_gathered_units",
                          "activations", "generation_gathered_policy", "kv_cache"), 0)
    models: dict[str, dict[str, int]] = {}
    notes = list(plan.notes)
    train_units = 0
    tp = plan.tensor_parallel_size
    sizes: dict[str, ShardedModel] = {}
    with fake_world(plan.world_size, tp) as mesh:
        for spec in plan.models:
            sizes[spec.name] = shard = shard_on_meta(spec, mesh, plan.compute_dtype)
            numel, local, block, root = shard.numel, shard.local, shard.block, shard.root
            eb = 1 if spec.int8 else torch.empty(0, dtype=spec.dtype).element_size()
            models[spec.name] = {"numel": numel, "local_numel": local, "bytes_per_param": eb}
            if spec.trainable:
                comp["params"] += local * eb
                comp["grads"] += local * eb
                if plan.optimizer == "adamw8bit":
                    comp["optimizer_state"] += 2 * local + 2 * 4 * math.ceil(local / ADAM8BIT_BLOCK)
                else:
                    comp["optimizer_state"] += 2 * local * eb
            else:
                comp["frozen_models"] += local * eb
            if not spec.int8 and plan.world_size > 1:
                # the root unit stays gathered through a forward; one block gathered and the next prefetched
                train_units = max(train_units, (root + 2 * block) * (cb if spec.trainable else eb))
    comp["fsdp_gathered_units"] = train_units
    trainable = [s for s in plan.models if s.trainable]
    tokens = plan.train_rows * plan.train_seq
    vocab_share = tp if plan.sharded_loss else 1  # RLHF's log-probabilities read gathered logits
    for spec in trainable:
        block = block_activation_bytes(spec.config, tokens, cb, tp)
        if plan.activation_checkpointing:  # block inputs are the residual stream: whole on every TP rank
            acts = spec.config.n_layers * tokens * spec.config.dim * cb + block
        else:
            acts = spec.config.n_layers * block
        if not spec.scalar:  # logits in float32, their log-softmax and its gradient
            acts += tokens * spec.config.vocab_size // vocab_share * 12
        comp["activations"] += acts
    notes.append(f"activations: {plan.train_rows} x {plan.train_seq} tokens per forward/backward; "
                 + ("checkpointed: every block's input + one block recomputed (block_activation_bytes)"
                    if plan.activation_checkpointing else "every block's saved tensors (block_activation_bytes)")
                 + "; LM logits 12 bytes/token/vocab entry (fp32 logits, log-softmax, gradient)"
                 + ("" if tp == 1 else f"; TP {tp}: heads and FFN width 1/{tp}, residual stream whole, logits "
                    + (f"1/{tp} of the vocabulary (loss_parallel)" if plan.sharded_loss
                       else "gathered over the vocabulary (RLHF log-probabilities)")))
    if plan.generation_rows:
        cfg = plan.models[0].config
        # each rank caches only its own n_kv_heads / tp heads (the attention is split by heads)
        comp["kv_cache"] = (plan.generation_rows * plan.generation_seq * cfg.n_layers * 2 * (cfg.n_kv_heads // tp)
                            * cfg.head_dim * cb)
        # gathered() gathers over the data-parallel dimension only: the whole policy without TP, this
        # rank's TP shard with it
        full = sizes[plan.models[0].name].gathered * cb
        persistent = sum(comp[k] for k in ("params", "grads", "optimizer_state", "frozen_models"))
        # the rule gathered() applies at run time, to the memory free beside the persistent state
        budget = None if gpu_gib is None else int((gpu_gib * GIB - persistent) * GATHER_FRACTION)
        what = "whole" if tp == 1 else f"as its TP shard (1/{tp}; the TP split is never undone)"
        if plan.world_size > 1 and fits_gathered(full, budget):
            comp["generation_gathered_policy"] = full
            notes.append(f"generation: the policy is gathered {what} over the data-parallel ranks once per "
                         f"rollout ({full / GIB:.1f} GiB in compute dtype); KV cache n_kv_heads/{tp} per rank")
        else:
            comp["generation_gathered_policy"] = train_units
            notes.append(f"generation: the policy gathered {what} does not fit beside the rest, so it decodes "
                         "sharded (FSDP2 gathers one block at a time per token; slow, see README)")
    persistent = sum(comp[k] for k in ("params", "grads", "optimizer_state", "frozen_models"))
    train = comp["fsdp_gathered_units"] + comp["activations"]
    gen = comp["generation_gathered_policy"] + comp["kv_cache"]
    total = persistent + max(train, gen)
    return Estimate(comp, total, None if gpu_gib is None else int(gpu_gib * GIB), models, notes)


def format_table(plan: StagePlan, est: Estimate) -> str:
    dtype = str(plan.compute_dtype).split(".")[-1]
    layout = (f"{plan.world_size} ranks" if plan.tensor_parallel_size == 1 else
              f"{plan.world_size} ranks = TP {plan.tensor_parallel_size} x FSDP {plan.data_parallel_size}")
    lines = [f"stage {plan.stage}, {layout}, compute {dtype}, optimizer {plan.optimizer}", "",
             f"{'component':<28}{'GiB per rank':>14}"]
    lines += [f"{name:<28}{value / GIB:>14.2f}" for name, value in est.components.items()]
    lines.append(f"{'total (peak)':<28}{est.total / GIB:>14.2f}")
    if est.gpu_bytes is not None:
        lines.append(f"fits {est.gpu_bytes / GIB:g} GiB: {'yes' if est.fits else 'NO'}")
        if est.over():
            lines.append(est.over())
    lines += ["", "models:"]
    lines += [f"  {n}: {m['numel'] / 1e9:.2f} B params, {m['local_numel'] / 1e6:.1f} M on this rank, "
              f"{m['bytes_per_param']} bytes each" for n, m in est.models.items()]
    lines += ["", "how:"] + [f"  {n}" for n in est.notes]
    return "\n".join(lines)


def summary(est: Estimate, plan: StagePlan | None = None) -> dict[str, Any]:
    layout = {} if plan is None else {"world_size": plan.world_size, "tensor_parallel_size": plan.tensor_parallel_size,
                                      "data_parallel_size": plan.data_parallel_size}
    return {"per_rank_gib": round(est.total / GIB, 3), "fits": est.fits, **layout,
            "components": {k: round(v / GIB, 3) for k, v in est.components.items()},
            "models": est.models, "over": est.over()}
