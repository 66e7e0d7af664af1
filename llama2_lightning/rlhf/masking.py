"""Statistics over the response tokens of a padded batch.

Llama 2's PPO (section 3.2.3) whitens rewards and advantages and averages losses over generated
tokens only; prompt and padding positions share the tensors but must not move any statistic. Every
function here selects with ``torch.where`` rather than multiplying by the mask, so even ``inf`` or
``nan`` in masked-out positions (e.g. log-probs of padding) cannot leak into the result.

``mask`` is a boolean tensor (0/1 integer or float masks are accepted and read as ``!= 0``) of the
same shape as ``x``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _as_bool_mask(x: Tensor, mask: Tensor) -> Tensor:
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal the values' shape {tuple(x.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the entries where ``mask`` is True (section 3.2.3: per-token PPO averages).

    x, mask: (...) of the same shape. With ``dim=None`` the result is a scalar over all masked
    entries; otherwise ``dim`` is reduced and the result has the remaining shape. An empty selection
    (no True entry, globally or in one slice) gives 0 rather than nan, so a minibatch whose responses
    are all empty contributes a zero loss instead of poisoning the optimiser state.
    """
    mask = _as_bool_mask(x, mask)
    selected = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if dim is None:
        total, count = selected.sum(), mask.sum()
    else:
        total, count = selected.sum(dim=dim), mask.sum(dim=dim)
    return total / count.clamp(min=1).to(total.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all entries where ``mask`` is True, as a scalar (section 3.2.3, WHITEN).

    x, mask: (...) of the same shape. ``unbiased`` applies Bessel's correction n/(n-1), matching
    ``torch.var``'s default; it needs at least two selected entries, and fewer raise ``ValueError``
    since the correction is undefined there.
    """
    mask = _as_bool_mask(x, mask)
    count = int(mask.sum())
    if count == 0:
        raise ValueError("masked_var: the mask selects no entries")
    if unbiased and count < 2:
        raise ValueError("masked_var: unbiased variance needs at least 2 selected entries, the mask selects 1")
    mean = masked_mean(x, mask)
    sq_dev = torch.where(mask, (x - mean) ** 2, torch.zeros((), dtype=x.dtype, device=x.device))
    return sq_dev.sum() / (count - 1 if unbiased else count)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Whiten ``x`` over the masked entries: zero mean and unit (unbiased) variance among them.

    This is the paper's WHITEN (section 3.2.3), also used on GAE advantages. x, mask: (...) of the
    same shape; returns the same shape. Masked-out entries are set to 0 in the output (they are not
    whitened values, and 0 is inert for every later masked reduction). With ``shift_mean=False`` the
    values are only rescaled and keep their mean, which is the convention for whitening rewards
    that must keep their sign. A single selected entry has no spread, so its variance is taken as 0
    and the output is ``x - mean`` (0) rather than an error; ``eps`` keeps the division finite then.
    """
    mask = _as_bool_mask(x, mask)
    count = int(mask.sum())
    if count == 0:
        raise ValueError("masked_whiten: the mask selects no entries")
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True) if count > 1 else torch.zeros((), dtype=x.dtype, device=x.device)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros((), dtype=x.dtype, device=x.device))


def last_true_index(mask: Tensor) -> Tensor:
    """Index of the last True entry of each row of a (B, T) mask, as a (B,) long tensor.

    This is where a response ends, which is where Llama 2's sequence-level reward lands (section
    3.2.3). Rows with no True entry raise ``ValueError`` naming them, since they have no response to
    reward.
    """
    if mask.dim() != 2:
        raise ValueError(f"last_true_index: expected a (B, T) mask, got shape {tuple(mask.shape)}")
    mask = mask if mask.dtype == torch.bool else mask != 0
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # (B, T)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).amax(dim=1)  # (B,)
    empty = (last < 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} of the response mask select no token")
    return last


def check_contiguous(mask: Tensor) -> None:
    """Raise ``ValueError`` unless each row of the (B, T) mask is one contiguous run of True (or empty).

    GAE and the last-token reward (section 3.2.3) treat a response as one unbroken episode; a gap
    would silently end the episode early, so it is rejected instead.
    """
    if mask.dim() != 2:
        raise ValueError(f"expected a (B, T) response mask, got shape {tuple(mask.shape)}")
    mask = mask if mask.dtype == torch.bool else mask != 0
    starts = mask[:, :1].long().sum(dim=1) + (mask[:, 1:] & ~mask[:, :-1]).long().sum(dim=1)  # (B,) runs per row
    bad = (starts > 1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"rows {bad} of the response mask are not one contiguous run of response tokens")
