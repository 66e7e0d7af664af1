"""Reward and value models: the shared ``Transformer`` trunk composed with a scalar head.

The paper's reward models are "initialized from pretrained chat model checkpoints" with "the
classification head for next-token prediction replaced with a regression head for outputting a
scalar reward" (Touvron et al. 2023, section 3.2.2). Here that is composition, not a subclass:
``ScalarModel(trunk=Transformer, head=ScalarHead)``. The trunk keeps Meta's parameter names, so a
pretrained or SFT checkpoint loads into it unchanged, and the head is a single ``(1, dim)`` matrix
named ``head.score.weight``; exporting to Hugging Face's ``LlamaForSequenceClassification`` is the
usual trunk mapping plus ``head.score.weight -> score.weight``.

A reward is read at the *last real token* of each sequence (the answer's EOS in the chat format).
Batches may be padded on either side: ``last_token_index`` finds that token from the attention mask
(not ``mask.sum(-1) - 1``, which points into the padding of a left-padded row), and left padding is
made invisible to real tokens with per-row RoPE positions and a key mask (``padded_inputs``), so a
sequence scores the same alone or in any padded batch.

Shape letters: B batch, T sequence length, C model dim.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor, nn

from llama2_lightning.checkpoint import load_model
from llama2_lightning.config import LlamaConfig
from llama2_lightning.model import Transformer


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last real token of each row, (B,) long, for a (B, T) mask (bool or 0/1).

    Correct for left padding, right padding and none. ``mask.sum(-1) - 1`` is only correct for
    right padding: on a left-padded row it points into the padding. A row with no real token has
    no score to read, so it is an error rather than a silent index.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, T), got shape {tuple(attention_mask.shape)}")
    valid = attention_mask.bool()
    if valid.size(1) == 0:
        raise ValueError("attention_mask has no columns (T = 0): every sequence needs at least one token")
    slots = torch.arange(valid.size(1), device=valid.device).expand_as(valid)  # (B, T)
    last = torch.where(valid, slots, -1).amax(dim=1)  # (B,), -1 where a row is all padding
    if bool((last < 0).any()):
        empty = torch.nonzero(last < 0).flatten().tolist()
        raise ValueError(f"attention_mask rows {empty} have no real token; every sequence needs at least one")
    return last


def padded_inputs(attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """RoPE positions (B, T) long and an attention mask (B, 1, T, T) bool for a padded batch.

    Real tokens get positions 0, 1, ... counted from each row's first real token, and attend
    causally to real tokens only, so they compute exactly what they would unpadded whatever the
    padding side. Every query also sees itself: a padding query would otherwise have no key at all
    and SDPA would return NaN, which then leaks into gradients even though the row is never read.
    """
    valid = attention_mask.bool()  # (B, T)
    T = valid.size(1)
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()  # (T, T) query >= key
    eye = torch.eye(T, dtype=torch.bool, device=valid.device)  # (T, T)
    mask = (causal[None] & valid[:, None, :]) | eye[None]  # (B, T, T)
    return positions, mask[:, None]  # (B, T), (B, 1, T, T)


def _is_right_padded(attention_mask: Tensor) -> bool:
    """True when every row is real tokens followed only by padding (or no padding at all).

    Then causal attention already keeps padding out of every real token and RoPE positions are the
    plain ``arange``, so the forward can keep SDPA's fused causal kernel instead of an explicit mask.
    """
    valid = attention_mask.bool()  # (B, T)
    lengths = valid.sum(dim=1, keepdim=True)  # (B, 1)
    prefix = torch.arange(valid.size(1), device=valid.device)[None, :] < lengths  # (B, T)
    return bool((valid == prefix).all())


class DroppedLMHead(nn.Module):
    """Stands in for a scalar model's ``trunk.output``: no parameters, and an error if called.

    Deleting the LM head frees ``vocab_size * dim`` weights (131M for 7B), but trunk code reads
    ``trunk.output.weight`` for the device and dtype of new tensors (``Transformer.setup_kv_cache``,
    generation, checkpoint loading). ``weight`` is therefore an empty, non-persistent buffer: it
    follows ``.to()`` / ``to_empty`` like the real weights, costs no memory, and stays out of the
    state dict, so the trunk's state dict is a checkpoint's minus ``output.weight``.
    """

    weight: Tensor

    def __init__(self, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", torch.empty(0, device=device, dtype=dtype), persistent=False)

    def forward(self, h: Tensor) -> Tensor:
        raise RuntimeError(
            "this Transformer's LM head was dropped to build a scalar (reward/value) model, so it has no "
            "logits; call forward_hidden(), or the ScalarModel that owns it"
        )


class ScalarHead(nn.Module):
    """Hidden state (..., C) -> scalar (...): one bias-free linear map, ``score.weight`` (1, C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        # Named like Hugging Face's LlamaForSequenceClassification.score so export is a rename.
        self.score = nn.Linear(dim, 1, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # N(0, 1/(C+1)) as in Ziegler et al. 2019 (lm-human-preferences' reward head). The trunk's
        # final RMSNorm makes hidden states ~unit RMS per channel, so initial scores are ~N(0, 1):
        # on the scale of the paper's margins (1/3 to 3), and, unlike a zero init, the trunk gets
        # a gradient from the first step.
        nn.init.normal_(self.score.weight, mean=0.0, std=1.0 / math.sqrt(self.dim + 1))

    def forward(self, h: Tensor) -> Tensor:
        return self.score(h).squeeze(-1)  # (...,)


class ScalarModel(nn.Module):
    """Transformer trunk + scalar head: a reward model (:meth:`forward`, one score per sequence) or
    a PPO value model (:meth:`forward_all`, one value per token).

    Scores are returned in float32 whatever the trunk's dtype, so ranking losses, whitening and GAE
    downstream do not inherit bf16 rounding of small reward differences.
    """

    def __init__(self, trunk: Transformer, head: ScalarHead | None = None) -> None:
        super().__init__()
        self.trunk = trunk
        if head is None:
            weight = trunk.tok_embeddings.weight
            # Built beside the trunk (meta device included) in its dtype; the head is tiny.
            with torch.device(weight.device):
                head = ScalarHead(trunk.config.dim).to(dtype=weight.dtype)
        if head.dim != trunk.config.dim:
            raise ValueError(f"head dim {head.dim} does not match the trunk's dim {trunk.config.dim}")
        self.head = head

    @property
    def config(self) -> LlamaConfig:
        return self.trunk.config

    # ---------------------------------------------------------------------------------- builders
    @classmethod
    def from_transformer(cls, trunk: Transformer, drop_lm_head: bool = True) -> ScalarModel:
        """Wrap ``trunk`` (shared, not copied) with a freshly initialised head.

        ``drop_lm_head`` replaces ``trunk.output`` by a :class:`DroppedLMHead`: the scalar model
        never computes logits, so the ``vocab_size x dim`` matrix would only cost memory, optimizer
        state and checkpoint space. Keep it (False) only if the same trunk object must still
        produce logits elsewhere.
        """
        if drop_lm_head and not isinstance(trunk.output, DroppedLMHead):
            weight = trunk.output.weight
            trunk.output = DroppedLMHead(device=weight.device, dtype=weight.dtype)
        return cls(trunk)

    @classmethod
    def from_config(cls, config: LlamaConfig) -> ScalarModel:
        """A randomly initialised scalar model (under ``torch.device("meta")`` for deferred init)."""
        return cls.from_transformer(Transformer(config), drop_lm_head=True)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str], fmt: str | None = None,
                        device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ScalarModel:
        """Trunk from a pretrained or SFT checkpoint (Meta, Hugging Face or Lightning ``.ckpt``),
        LM head dropped, new head: the paper's reward-model initialisation (section 3.2.2)."""
        return cls.from_transformer(load_model(path, fmt, device=device, dtype=dtype), drop_lm_head=True)

    def load_trunk_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True) -> None:
        """Load Transformer weights (e.g. an SFT checkpoint's) into the trunk; ``output.weight`` is
        ignored when the LM head was dropped, every other name must match."""
        if isinstance(self.trunk.output, DroppedLMHead):
            state_dict = {k: v for k, v in state_dict.items() if k != "output.weight"}
        self.trunk.load_state_dict(state_dict, strict=strict)

    # ----------------------------------------------------------------------------------- forward
    def forward(self, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """One score per sequence, (B,) float32, read at each row's last real token.

        tokens: (B, T) ids. attention_mask: (B, T), True (or 1) on real tokens, padding on either
        side; ``None`` means no padding.
        """
        if attention_mask is None:
            h = self.trunk.forward_hidden(tokens)  # (B, T, C)
            last = h[:, -1]  # (B, C)
        else:
            if attention_mask.shape != tokens.shape:
                raise ValueError(
                    f"attention_mask {tuple(attention_mask.shape)} must match tokens {tuple(tokens.shape)}"
                )
            idx = last_token_index(attention_mask)  # (B,)
            if _is_right_padded(attention_mask):
                h = self.trunk.forward_hidden(tokens)  # (B, T, C): padding is after every real token
            else:
                positions, mask = padded_inputs(attention_mask)
                h = self.trunk.forward_hidden(tokens, positions=positions, mask=mask)  # (B, T, C)
            last = h[torch.arange(h.size(0), device=h.device), idx]  # (B, C)
        # Gather first, then score: the head runs on B vectors instead of B * T.
        return self.head(last).float()  # (B,)

    def forward_all(self, tokens: Tensor, positions: Tensor | None = None, mask: Tensor | None = None,
                    *, attention_mask: Tensor | None = None) -> Tensor:
        """One value per token, (B, T) float32: the PPO value model's V(s_t).

        ``positions`` / ``mask`` are passed to ``Transformer.forward_hidden`` as they are (e.g. the
        ones generation used for a left-padded rollout). ``attention_mask`` (B, T) is the shortcut
        that builds both with :func:`padded_inputs`; values at padding are meaningless, mask them.
        """
        if attention_mask is not None:
            if positions is not None or mask is not None:
                raise ValueError("pass either attention_mask or positions/mask, not both")
            if not _is_right_padded(attention_mask):
                positions, mask = padded_inputs(attention_mask)
        h = self.trunk.forward_hidden(tokens, positions=positions, mask=mask)  # (B, T, C)
        return self.head(h).float()  # (B, T)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
