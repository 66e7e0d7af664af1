"""The Llama 2 decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU, KV cache.

Parameter names follow Meta's reference implementation (``tok_embeddings``, ``layers.N.attention.wq``,
``feed_forward.w1``, ``attention_norm``, ``ffn_norm``, ``norm``, ``output``) so a Meta state dict loads
with ``strict=True``. Nothing here chooses a device or a dtype: build the model under
``torch.device("meta")`` and materialise it with ``to_empty`` + ``reset_parameters``, or build it
wherever the caller's default device is.

Shape letters: B batch, T query length, S key length (cache slots), H query heads, G KV heads,
D head dim, C model dim, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from llama2_lightning.config import LlamaConfig


def rope_frequencies(seq_len: int, head_dim: int, theta: float, device: torch.device | None = None,
                     scaling: dict[str, Any] | None = None) -> Tensor:
    """RoPE rotations as unit complex numbers, (seq_len, head_dim // 2) complex64 (Su et al. 2021; Meta's
    ``precompute_freqs_cis``). The model keeps ``torch.view_as_real`` of it, in float32 whatever the
    weights' dtype. ``scaling`` is a checked ``LlamaConfig.rope_scaling`` (Llama 3's)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if scaling is not None:
        inv_freq = llama3_scaled_frequencies(inv_freq, scaling)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)  # (S, D/2)
    return torch.polar(torch.ones_like(angles), angles)


def llama3_scaled_frequencies(inv_freq: Tensor, scaling: dict[str, Any]) -> Tensor:
    """Llama 3.1's context extension (Meta's ``apply_scaling``): frequencies whose wavelength exceeds
    ``original / low_freq_factor`` are divided by ``factor``, those shorter than ``original /
    high_freq_factor`` are kept, and the band between blends the two linearly in ``original / wavelength``."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    smooth = (original / wavelength - low) / (high - low)  # 0 at the long end of the band, 1 at the short end
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    long_waves = wavelength > original / low
    short_waves = wavelength < original / high
    return torch.where(long_waves, inv_freq / factor, torch.where(short_waves, inv_freq, blended))


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate interleaved pairs ``(x[2i], x[2i+1])`` of ``x`` (B, T, heads, D) by ``rope`` (B or 1, T,
    D/2, 2), the rotations' (cos, sin): ``torch.view_as_real`` of :func:`rope_frequencies`' table.
    Meta's convention; Hugging Face checkpoints permute ``wq``/``wk`` to match their half-split
    convention, which the converters undo.

    Eager, the rotation is one complex multiply, about 3x faster (forward + backward on CPU) than the
    same rotation spelt out in real arithmetic. Under ``torch.compile`` it is spelt out: inductor
    generates no code for complex operators and would fall back to eager kernels there, while the real
    form fuses with its neighbours."""
    if torch.compiler.is_compiling():
        rot = rope.unsqueeze(2)  # (B, T, 1, D/2, 2)
        cos, sin = rot[..., 0], rot[..., 1]  # (B, T, 1, D/2) each
        pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, heads, D/2, 2)
        even, odd = pairs[..., 0], pairs[..., 1]  # (B, T, heads, D/2) each
        rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)  # (B, T, heads, D/2, 2)
        return rotated.flatten(-2).type_as(x)  # (B, T, heads, D)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, heads, D/2) complex
    rot = torch.view_as_complex(rope).unsqueeze(2)  # (B, T, 1, D/2) complex
    return torch.view_as_real(pairs * rot).flatten(-2).type_as(x)  # (B, T, heads, D)


class KVCache(nn.Module):
    """Pre-allocated keys and values for one attention layer, indexed by cache slot."""

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)  # (B, G, S, D)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k``/``v`` (B, G, T, D) at slots ``input_pos`` (T,); return the whole cache (B, G, S, D)."""
        if self.k.dtype != k.dtype:  # e.g. FSDP2 computes in bf16 over fp32 master weights
            self.k, self.v = self.k.to(k.dtype), self.v.to(k.dtype)
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        # Heads held by this module: all of them, or this rank's share under tensor parallelism
        # (tensor_parallel.py divides both by the TP size; the forward reshapes by the weights' width).
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor | None = None, input_pos: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        # H and G are this rank's heads (n_heads / tp, n_kv_heads / tp under tensor parallelism)
        q = self.wq(x).view(B, T, -1, self.head_dim)  # (B, T, H, D)
        k = self.wk(x).view(B, T, -1, self.head_dim)  # (B, T, G, D)
        v = self.wv(x).view(B, T, -1, self.head_dim)  # (B, T, G, D)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, G, S, D)
            if mask is not None:  # attend only to the slots the mask covers
                k, v = k[:, :, : mask.size(-1)], v[:, :, : mask.size(-1)]
        # enable_gqa lets SDPA broadcast the G key/value heads over the H query heads without
        # materialising H copies where the kernel supports it.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=k.size(1) != q.size(1)
        )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H * D)
        return self.wo(y)


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        assert config.hidden_dim is not None
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TiedOutput(nn.Module):
    """The output projection of a model whose config ties it to the embeddings: it owns no tensor and
    multiplies by ``tok_embeddings.weight``, so the state dict holds the one tensor under its Meta
    name and no sharing survives or breaks through meta-device init, ``to_empty`` or FSDP. ``weight``
    reads the embedding's, for callers that ask the output for the model's device and dtype."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        # In a list, not as an attribute, so the embedding is not registered as this module's child
        # (it would appear twice in the state dict); deepcopy maps it to the copied model's embedding.
        self._embedding = [embedding]

    @property
    def weight(self) -> Tensor:
        return self._embedding[0].weight

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self._embedding[0].weight)


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor | None = None, input_pos: Tensor | None = None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.output: nn.Module = (TiedOutput(self.tok_embeddings) if config.tie_word_embeddings
                                  else nn.Linear(config.dim, config.vocab_size, bias=False))
        # (cos, sin) of every position's rotations, (S, D/2, 2) float32: torch.view_as_real of
        # rope_frequencies' complex table, kept real so that compiled code meets no complex tensor
        table = torch.empty(config.max_seq_len, config.head_dim // 2, 2, dtype=torch.float32)  # (S, D/2, 2)
        self.register_buffer("rope_table", table, persistent=False)
        self.reset_parameters()
        # Recompute each block in backward instead of storing its activations (set by the training
        # modules; plain torch.utils.checkpoint keeps Meta's parameter names intact).
        self.activation_checkpointing = False

    @classmethod
    def from_name(cls, name: str, **overrides) -> Transformer:
        return cls(LlamaConfig.from_name(name, **overrides))

    def reset_parameters(self) -> None:
        """Recompute the RoPE table (this module's only own tensor); children reset their own weights.
        Lightning calls this after materialising a meta-device model."""
        with torch.no_grad():
            freqs = rope_frequencies(
                self.config.max_seq_len, self.config.head_dim, self.config.rope_theta, device=self.rope_table.device,
                scaling=self.config.rope_scaling,
            )
            self.rope_table.copy_(torch.view_as_real(freqs))

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # `model.to(torch.bfloat16)` casts floating-point buffers too; positions up to 4,096 need the
        # RoPE table in full precision, so rebuild it in float32 wherever it has been moved.
        super()._apply(fn, recurse)
        if self.rope_table.dtype != torch.float32:
            self.rope_table = torch.empty_like(self.rope_table, dtype=torch.float32)
            if not self.rope_table.is_meta:
                self.reset_parameters()
        return self

    # ------------------------------------------------------------------ KV cache
    def setup_kv_cache(self, batch_size: int, max_seq_len: int | None = None, dtype: torch.dtype | None = None) -> None:
        """Allocate a cache of ``max_seq_len`` slots per layer on the weights' device and dtype, for
        the KV heads each layer holds (this rank's share under tensor parallelism)."""
        max_seq_len = max_seq_len or self.config.max_seq_len
        if max_seq_len > self.config.max_seq_len:
            raise ValueError(f"KV cache of {max_seq_len} slots exceeds max_seq_len={self.config.max_seq_len}")
        weight = self.output.weight
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(
                batch_size, max_seq_len, layer.attention.n_kv_heads, self.config.head_dim,
                dtype=dtype or weight.dtype, device=weight.device,
            )

    def reset_kv_cache(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None

    @property
    def has_kv_cache(self) -> bool:
        return self.layers[0].attention.kv_cache is not None if len(self.layers) else False

    # ------------------------------------------------------------------ forward
    def forward_hidden(self, tokens: Tensor, input_pos: Tensor | None = None, positions: Tensor | None = None,
                       mask: Tensor | None = None) -> Tensor:
        """Final normalised hidden states (B, T, C), for the LM head or a scalar head.

        tokens: (B, T) ids. input_pos: (T,) cache slots to write (only with a KV cache).
        positions: RoPE positions, (T,) or (B, T) for per-row offsets (left padding); defaults to
        ``input_pos`` or ``arange(T)``. mask: bool (B|1, 1, T, S), True where a query may attend a key;
        ``None`` means plain causal attention over the T tokens (or, with a cache, over slots
        ``<= input_pos``)."""
        B, T = tokens.shape
        if positions is None:
            positions = input_pos if input_pos is not None else torch.arange(T, device=tokens.device)
        if self.has_kv_cache and input_pos is not None and mask is None:
            slots = self.layers[0].attention.kv_cache.k.size(2)
            mask = torch.arange(slots, device=tokens.device)[None, :] <= input_pos[:, None]  # (T, S)
            mask = mask[None, None]  # (1, 1, T, S)
        rope = self.rope_table[positions]  # (T, D/2, 2) or (B, T, D/2, 2)
        if rope.dim() == 3:
            rope = rope.unsqueeze(0)  # (1, T, D/2, 2)
        h = self.tok_embeddings(tokens)  # (B, T, C)
        for layer in self.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, rope, mask, input_pos, use_reentrant=False)
            else:
                h = layer(h, rope, mask, input_pos)
        return self.norm(h)

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, positions: Tensor | None = None,
                mask: Tensor | None = None, last_only: bool = False, sharded_logits: bool = False) -> Tensor:
        """Next-token logits (B, T, V), or (B, 1, V) for the last position only with ``last_only`` (a
        prefill needs no more, and the (B, T, V) projection is its largest matmul); other arguments as
        in :meth:`forward_hidden`. Going through ``forward`` keeps FSDP2's root hooks in charge.

        Under tensor parallelism the LM head leaves each rank V/tp of the logits; they are gathered
        unless ``sharded_logits``, which returns the vocabulary-sharded DTensor for a loss that
        never gathers them (``tensor_parallel.cross_entropy``)."""
        hidden = self.forward_hidden(tokens, input_pos, positions, mask)
        logits = self.output(hidden[:, -1:] if last_only else hidden)  # (B, T, V), or V/tp per rank under TP
        if isinstance(logits, DTensor) and not sharded_logits:
            logits = logits.full_tensor()  # (B, T, V)
        return logits

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward = 3x forward): 6 N for the matmuls plus the
        attention scores, 12 * n_layers * dim * seq_len (Kaplan et al. 2020; PaLM appendix B)."""
        seq_len = seq_len or self.config.max_seq_len
        n = self.num_parameters()  # a tied embedding's only matmul is the output projection
        if not self.config.tie_word_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return 6 * n + 12 * self.config.n_layers * self.config.dim * seq_len
