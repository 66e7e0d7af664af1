"""Batched sampling with a pre-allocated (static) KV cache.

Prompts of different lengths share one batch by left padding: every row's prompt ends in the same
cache slot, so one decode step serves all rows. RoPE positions are per row (a row's first real token
is position 0) and padded slots are masked out, so a row generates exactly what it would alone.

Every decode step has the same shapes: one token per row against all ``P + max_new_tokens`` cache
slots, the slots not yet written masked out. That is what lets ``compile=True`` compile the step once
per batch shape, and it leaves the loop with only the sampling step to do in Python.

``num_samples=K`` (best-of-K, rejection sampling) prefills each distinct prompt once and copies its
cache to its K rows, instead of prefilling K copies of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llama2_lightning.distributed import is_sharded
from llama2_lightning.model import KVCache, Transformer
from llama2_lightning.shard_loading import device_mesh_of
from llama2_lightning.tensor_parallel import is_tensor_parallel, replicate_across_tp


@dataclass
class GenerationOutput:
    tokens: Tensor
    """(B, N) sampled tokens; ``pad_id`` after a row's EOS."""
    logprobs: Tensor
    """(B, N) log-probability of each sampled token under the model (temperature 1, no top-k/top-p
    filtering), which is what PPO's ratio needs; 0 after a row ends."""
    lengths: Tensor
    """(B,) new tokens per row, its EOS included."""
    logits: Tensor | None = None
    """(B, N, V) float32 next-token logits of every step, only with ``output_logits=True``."""

    def as_lists(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths.tolist())]


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """Draw one token per row from ``logits`` (B, V); greedy when ``temperature == 0``. Returns (B,)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    if top_p < 1.0:
        # Nucleus sampling (Holtzman et al. 2020): keep the smallest set of tokens whose mass reaches top_p.
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # the first token is never dropped
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _DecodeStep(nn.Module):
    """One token per row through the cached model: (B, 1) ids -> (B, V) float32 logits."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, input_pos: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        return self.model(tokens, input_pos=input_pos, positions=positions, mask=mask)[:, -1].float()


# Inductor's C++ GEMM micro-kernels for a handful of rows beat MKL's sgemm on CPU (about 2-3x on the
# ~100M model's projections), but they need the weights packed ahead of time, i.e. frozen as constants.
# Freezing is read outside torch.compile's per-call options, hence a config patch around every call
# (compilation happens at the first call, and again whenever a guard fails).
_CPU_INDUCTOR_CONFIG = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}

# On CUDA a decode step is a few hundred small kernels, so launching them costs more than running
# them: "reduce-overhead" replays the whole step as one CUDA graph. Set to "default" for plain
# inductor kernels, launched one by one.
CUDA_COMPILE_MODE = "reduce-overhead"


class _CompiledDecodeStep(nn.Module):
    """``torch.compile`` of :class:`_DecodeStep`, called under the inductor settings it was built for."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        device = model.output.weight.device.type
        self.cpu = device == "cpu"
        self.cuda_graphs = device == "cuda" and CUDA_COMPILE_MODE == "reduce-overhead"
        mode = CUDA_COMPILE_MODE if device == "cuda" else None
        self.step = torch.compile(_DecodeStep(model), dynamic=False, mode=mode)
        self.caches: dict[tuple[torch.Size, torch.dtype], list[KVCache]] = {}  # per (B, G, S, D) shape and dtype

    def adopt_cache(self, model: Transformer) -> None:
        """Copy the prefill's cache into buffers this step keeps between calls, one set per batch
        shape, and decode in those: the compiled code (and a CUDA graph's fixed addresses) is
        specialised to its cache tensors, so fresh ones would recompile (or re-record) it."""
        fresh = [layer.attention.kv_cache for layer in model.layers]
        key = (fresh[0].k.shape, fresh[0].k.dtype)
        if key not in self.caches:
            B, G, S, D = fresh[0].k.shape
            self.caches[key] = [KVCache(B, S, G, D, dtype=c.k.dtype, device=c.k.device) for c in fresh]
        for layer, src, dst in zip(model.layers, fresh, self.caches[key]):
            dst.k.copy_(src.k)
            dst.v.copy_(src.v)
            layer.attention.kv_cache = dst

    def forward(self, tokens: Tensor, input_pos: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        if self.cuda_graphs:
            # Each call is a new step, and the graph's output is overwritten by the next replay, so the
            # caller gets a copy (B x V floats) it may keep. The caches are module buffers, which the
            # graph treats as fixed addresses and updates in place.
            torch.compiler.cudagraph_mark_step_begin()
            return self.step(tokens, input_pos, positions, mask).clone()
        if not self.cpu:
            return self.step(tokens, input_pos, positions, mask)
        import torch._inductor.config as inductor_config

        with inductor_config.patch(_CPU_INDUCTOR_CONFIG):
            return self.step(tokens, input_pos, positions, mask)


def _weights_version(model: nn.Module) -> tuple[tuple[int, int], ...]:
    """Identity of every parameter and, on CPU, its in-place version counter: an optimiser step or a
    ``load_state_dict`` changes the latter, which invalidates a compiled step that froze the weights.
    Off CPU nothing is frozen: the compiled step (and its CUDA graph) reads the weights where they are."""
    frozen = model.output.weight.device.type == "cpu"
    return tuple((p.data_ptr(), p._version if frozen else 0) for p in model.parameters())


def compiled_decode_step(model: Transformer) -> nn.Module:
    """The model's decode step through ``torch.compile``, built once and kept on the model.

    On CPU the step is compiled with frozen weights (``_CPU_INDUCTOR_CONFIG``), so it is rebuilt
    whenever the weights change (an RLHF policy after each optimiser step): compiling pays for many
    tokens from fixed weights, not for one short rollout per update. On CUDA it is compiled once, as
    a CUDA graph (``CUDA_COMPILE_MODE``), and follows the weights' updates in place."""
    version = _weights_version(model)
    cached = model.__dict__.get("_compiled_decode")  # outside the module tree: not a submodule
    if cached is not None and cached[0] == version:
        return cached[1]
    if cached is not None:
        import torch._dynamo as dynamo

        # Frozen constants are baked into the compiled code, whose cache is keyed by the step's code
        # object: only a reset makes dynamo re-trace with the new weights.
        dynamo.reset()
    step = _CompiledDecodeStep(model)
    model.__dict__["_compiled_decode"] = (version, step)
    return step


def release_compiled_decode(model: Transformer) -> None:
    """Drop the compiled decode step kept on ``model`` with its caches (one per batch shape) and, on
    CUDA, its graphs' memory pool once nothing else holds it; the next ``compile=True`` call compiles
    again."""
    model.__dict__.pop("_compiled_decode", None)


def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float = 1.0, eos_id: int | None = None, pad_id: int = 0,
             seed: int | None = None, num_samples: int = 1, compile: bool = False,
             output_logits: bool = False, batch_size: int | None = None,
             allowed_tokens: Tensor | None = None) -> GenerationOutput:
    """Sample up to ``max_new_tokens`` after each prompt; a row stops at its first ``eos_id``.

    ``num_samples``: answers per prompt, returned as ``len(prompts) * num_samples`` rows in the order
    prompt 0 x K, prompt 1 x K, ...; each prompt is prefilled once. ``compile``: run the decode step
    through ``torch.compile`` (:func:`compiled_decode_step`; the first call compiles, minutes on a
    small CPU), with prompts left-padded to :func:`prompt_bucket` so that other prompt lengths reuse it.
    ``output_logits``: also return every step's logits (memory: B x N x V floats).

    The model's KV cache is allocated for the call and released afterwards. With ``compile``, the
    compiled step keeps a cache of its own per batch shape (and, on CUDA, its CUDA graphs' memory)
    on the model between calls, until :func:`release_compiled_decode`. Its prompt bucket costs up to
    twice the prompt's slots in prefill and attention; padded slots are masked, so the samples are
    those of eager decoding up to floating-point rounding.

    ``allowed_tokens``: (len(prompts), V) bool, the tokens each prompt's answers may use (every other
    token's logit is -inf before sampling, so the returned logprobs are those of the constrained
    distribution; ``output_logits`` stay the model's, unmasked); the Ghost Attention sampler enforces a
    checkable instruction with it.

    ``batch_size``: decode at most this many prompts at a time (each with its ``num_samples`` rows),
    which bounds the KV cache (B x (P + N) x layers x 2 x G x D); the rows come back in order, as one
    output. A sharded model (FSDP2, not gathered) decodes in lockstep: every rank runs the same number
    of chunks and steps, until every rank's rows have ended, because each forward is a collective."""
    sync = _lockstep_group(model)
    # FSDP2's all-gathered parameters cannot be used under inference_mode; no_grad is enough there.
    # Compiled code traced under no_grad is reused under no_grad only, so it keeps to no_grad too.
    with torch.inference_mode(not (is_sharded(model) or compile)), torch.no_grad():
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        if allowed_tokens is not None:
            vocab = model.config.vocab_size
            if allowed_tokens.dim() != 2 or tuple(allowed_tokens.shape) != (len(prompts), vocab):
                raise ValueError(f"allowed_tokens must be (len(prompts)={len(prompts)}, vocab_size={vocab}), "
                                 f"got {tuple(allowed_tokens.shape)}")
            empty = (~allowed_tokens.any(dim=-1)).nonzero().flatten().tolist()  # prompts with no token left
            if empty:
                raise ValueError(f"allowed_tokens allows no token for prompts {empty}: nothing could be sampled")
        size = batch_size or max(len(prompts), 1)
        chunks = [prompts[i:i + size] for i in range(0, len(prompts), size)]
        n_chunks = _max_over_ranks(len(chunks), sync, model.output.weight.device)
        outs = []
        for c in range(n_chunks):
            # a rank with fewer chunks decodes a throwaway one so that the others' collectives complete
            part = chunks[c] if c < len(chunks) else prompts[:1]
            lo = c * size if c < len(chunks) else 0
            allowed = None if allowed_tokens is None else allowed_tokens[lo:lo + len(part)]  # (b, V)
            out = _generate(model, part, max_new_tokens, temperature, top_k, top_p, eos_id, pad_id,
                            None if seed is None else seed + c, num_samples, compile, output_logits, sync,
                            allowed)
            if c < len(chunks):
                outs.append(out)
        return outs[0] if len(outs) == 1 else _concat(outs, pad_id)


def _lockstep_group(model: nn.Module) -> object | None:
    """The process group whose ranks must step together: that of a sharded model's mesh, else none."""
    mesh = device_mesh_of(model)
    if mesh is None or not torch.distributed.is_initialized() or mesh.size() == 1:
        return None
    return mesh.get_group() if mesh.ndim == 1 else torch.distributed.group.WORLD


def _max_over_ranks(value: int, group: object | None, device: torch.device) -> int:
    if group is None:
        return value
    t = torch.tensor([value], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=group)
    return int(t.item())


def _concat(outs: list[GenerationOutput], pad_id: int) -> GenerationOutput:
    """Stack chunk outputs row-wise, padding each to the longest chunk's N."""
    n = max(o.tokens.size(1) for o in outs)

    def pad(t: Tensor, value: float) -> Tensor:  # (b, n_i, ...) -> (b, n, ...)
        extra = n - t.size(1)
        if extra == 0:
            return t
        return torch.cat([t, t.new_full((t.size(0), extra, *t.shape[2:]), value)], dim=1)

    logits = [o.logits for o in outs]
    return GenerationOutput(
        torch.cat([pad(o.tokens, pad_id) for o in outs]), torch.cat([pad(o.logprobs, 0.0) for o in outs]),
        torch.cat([o.lengths for o in outs]),
        torch.cat([pad(x, 0.0) for x in logits]) if all(x is not None for x in logits) else None,
    )


def prompt_bucket(longest: int, max_new_tokens: int, max_seq_len: int) -> int:
    """The padded prompt length of a compiled generation: the next power of two from ``longest``, as
    far as ``max_seq_len`` allows. Batches whose longest prompts share a bucket share the compiled
    step (and its CUDA graph); padded slots are masked."""
    return max(longest, min(1 << (longest - 1).bit_length(), max_seq_len - max_new_tokens))


def _left_pad(prompts: Sequence[Sequence[int]], P: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(B, P) ids left-padded with id 0 to ``P``, at least the longest prompt (padded slots are masked,
    so any valid id will do; pad_id may be -1) and (B,) prompt lengths."""
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.zeros((len(prompts), P), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = torch.as_tensor(list(p), dtype=torch.long, device=device)
    return tokens, lengths


def _copy_rows_of_cache(model: Transformer, k: int) -> None:
    """Repeat every layer's cache rows ``k`` times, row i to rows i*k .. i*k + k - 1."""
    for layer in model.layers:
        cache = layer.attention.kv_cache
        cache.k = cache.k.repeat_interleave(k, dim=0)  # (B * k, G, S, D)
        cache.v = cache.v.repeat_interleave(k, dim=0)  # (B * k, G, S, D)


def _generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
              top_k: int | None, top_p: float, eos_id: int | None, pad_id: int, seed: int | None,
              num_samples: int, compile: bool, output_logits: bool, sync: object | None = None,
              allowed: Tensor | None = None) -> GenerationOutput:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and every prompt needs at least one token")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if compile and is_tensor_parallel(model):
        raise ValueError("generate(compile=True) needs a model without tensor parallelism; its decode step "
                         "runs eager, each rank on its own heads")
    device = model.output.weight.device
    longest = max(len(p) for p in prompts)
    P = prompt_bucket(longest, max_new_tokens, model.config.max_seq_len) if compile else longest
    tokens, lengths = _left_pad(prompts, P, device)  # (B0, P), (B0,)
    total = P + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(
            f"longest prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={model.config.max_seq_len}"
        )
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    slots = torch.arange(total, device=device)
    pad = (P - lengths)[:, None]  # (B0, 1) left padding per row
    valid = slots[None, :] >= pad  # (B0, total): pad slots are never attended
    positions = (slots[None, :] - pad).clamp(min=0)  # (B0, total) per-row RoPE positions
    # Causal over slots, keys restricted to real tokens; a pad query sees itself so no row of the
    # mask is empty (an all-masked row would make SDPA return NaN).
    causal = slots[:P, None] >= slots[None, :P]  # (P, P)
    eye = torch.eye(P, dtype=torch.bool, device=device)
    prefill_mask = ((causal & valid[:, None, :P]) | eye)[:, None]  # (B0, 1, P, P)

    was_training = model.training
    model.eval()
    step = compiled_decode_step(model) if compile else _DecodeStep(model)
    model.setup_kv_cache(tokens.size(0), total)
    try:
        logits = model(tokens, input_pos=slots[:P], positions=positions[:, :P], mask=prefill_mask,
                       last_only=True)[:, -1].float()  # (B0, V)
        if num_samples > 1:
            _copy_rows_of_cache(model, num_samples)
            logits = logits.repeat_interleave(num_samples, dim=0)  # (B, V)
            valid = valid.repeat_interleave(num_samples, dim=0)  # (B, total)
            positions = positions.repeat_interleave(num_samples, dim=0)  # (B, total)
        if isinstance(step, _CompiledDecodeStep):
            step.adopt_cache(model)
        if allowed is not None:
            allowed = allowed.to(device).repeat_interleave(num_samples, dim=0)  # (B, V)
        return _decode(step, logits, valid, positions, P, max_new_tokens, temperature, top_k, top_p, eos_id,
                       pad_id, generator, output_logits, sync, model, allowed)
    finally:
        model.reset_kv_cache()
        model.train(was_training)


def _decode(step: nn.Module, logits: Tensor, valid: Tensor, positions: Tensor, P: int, max_new_tokens: int,
            temperature: float, top_k: int | None, top_p: float, eos_id: int | None, pad_id: int,
            generator: torch.Generator | None, output_logits: bool, sync: object | None = None,
            model: nn.Module | None = None, allowed: Tensor | None = None) -> GenerationOutput:
    """The token loop: ``logits`` (B, V) are the prefill's; ``valid`` / ``positions`` (B, S) per slot."""
    B, V = logits.shape
    device = logits.device
    slots = torch.arange(valid.size(1), device=device)
    out_tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_logprobs = torch.zeros((B, max_new_tokens), device=device)
    all_logits = torch.zeros((B, max_new_tokens, V), device=device) if output_logits else None
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    out_lengths = torch.zeros(B, dtype=torch.long, device=device)
    for t in range(max_new_tokens):
        if all_logits is not None:
            all_logits[:, t] = logits
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))  # (B, V)
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        if temperature > 0 and model is not None:
            # tensor parallel: the TP group's ranks hold the same logits but maybe not the same RNG
            nxt = replicate_across_tp(nxt, model)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, nxt[:, None]).squeeze(-1)  # (B,)
        out_tokens[:, t] = torch.where(finished, pad_id, nxt)
        out_logprobs[:, t] = torch.where(finished, 0.0, logp)
        out_lengths += (~finished).long()
        if eos_id is not None:
            finished |= nxt == eos_id
        # sharded, stop only when every rank's rows have ended: each forward is a collective
        if (eos_id is not None or sync is not None) and \
                _max_over_ranks(int(not bool(finished.all())), sync, device) == 0:
            break
        if t + 1 == max_new_tokens:
            break
        slot = P + t
        # Same shapes every step: all slots, those not yet written (or padding) masked out.
        step_mask = (valid & (slots <= slot))[:, None, None, :]  # (B, 1, 1, S)
        # finished rows keep decoding their (ignored) samples: pad_id need not be a valid token id
        logits = step(nxt[:, None], slots[slot : slot + 1], positions[:, slot : slot + 1], step_mask)  # (B, V)
    n = int(out_lengths.max()) if B else 0
    return GenerationOutput(out_tokens[:, :n], out_logprobs[:, :n], out_lengths,
                            all_logits[:, :n] if all_logits is not None else None)
