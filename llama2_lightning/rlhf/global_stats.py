"""Statistics over the whole data-parallel batch, not each rank's rows (issue 15).

The paper whitens rewards and advantages over an iteration's 512 prompts (section 3.2.3); under data
parallelism each rank holds a few of them (8 per GPU for the 70B config), so per-rank whitening would
use 64 different means and variances. These functions all-reduce sums and counts over ``group`` (the
data-parallel group; ``None``: the default group, or no communication when torch.distributed is not
initialised) and return what one process holding every row would compute, with
:func:`llama2_lightning.rlhf.masking.masked_whiten`'s conventions (unbiased variance, masked-out
entries 0, a lone entry's variance 0).

They also keep collectives in lockstep: ranks whose rejection-sampling pools differ in size must still
run the same number of sharded forward/backward passes, or the ranks with more rows wait forever in an
all-gather; :func:`lockstep_batches` gives every rank the same number of micro-batches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


def _active(group: Any) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _all_reduce_sum(t: Tensor, group: Any) -> Tensor:
    if _active(group):
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def global_masked_moments(x: Tensor, mask: Tensor, group: Any = None) -> tuple[Tensor, Tensor, int]:
    """(mean, unbiased variance, count) of ``x`` where ``mask`` is True, over every rank's entries.

    x, mask: (...) of the same shape on each rank (shapes may differ between ranks). Two passes, as
    one process would compute them: the global mean first, then the squared deviations from it (a
    sum of squares would lose digits when the mean is large against the spread). The variance of a
    single entry is 0. Raises ``ValueError`` when no rank selects anything."""
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal the values' shape {tuple(x.shape)}")
    mask = mask if mask.dtype == torch.bool else mask != 0
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    xs = x.to(torch.float64)
    sums = torch.stack([torch.where(mask, xs, zero).sum(), mask.sum().to(torch.float64)])  # (2,)
    total, count = _all_reduce_sum(sums, group).unbind()
    n = int(count.item())
    if n == 0:
        raise ValueError("global_masked_moments: no rank's mask selects an entry")
    mean = total / n
    sq = _all_reduce_sum(torch.where(mask, (xs - mean) ** 2, zero).sum(), group)
    var = sq / (n - 1) if n > 1 else zero
    return mean.to(x.dtype), var.to(x.dtype), n


def global_masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
                         group: Any = None) -> Tensor:
    """WHITEN (section 3.2.3) of ``x`` with the mean and variance of every rank's masked entries;
    otherwise as ``masked_whiten``: same shape out, masked-out entries 0, ``shift_mean=False`` keeps
    the mean (rewards keep their sign)."""
    mean, var, _ = global_masked_moments(x, mask, group)
    mask = mask if mask.dtype == torch.bool else mask != 0
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros((), dtype=x.dtype, device=x.device))


def global_whiten_rewards(r: Tensor, shift_mean: bool = True, eps: float = 1e-8, group: Any = None) -> Tensor:
    """WHITEN of a (B,) batch of sequence rewards over every rank's rollouts."""
    return global_masked_whiten(r, torch.ones_like(r, dtype=torch.bool), shift_mean, eps, group)


def global_mean(x: Tensor, group: Any = None) -> Tensor:
    """Mean of every rank's entries of ``x`` (a metric such as reward or KL, weighted by rows, not ranks)."""
    mean, _, _ = global_masked_moments(x, torch.ones_like(x, dtype=torch.bool), group)
    return mean


def global_means(values: Mapping[str, Tensor], group: Any = None,
                 masks: Mapping[str, Tensor] | None = None) -> dict[str, float]:
    """The mean of each ``values[k]`` over every rank's entries (where ``masks[k]`` is True, when given),
    all in one all-reduce of their sums and counts: an iteration's metrics (reward, KL, lengths) as
    one process holding the whole batch would log them. A key nothing selects gives 0."""
    if not values:
        return {}
    masks = masks or {}
    device = next(iter(values.values())).device
    sums = []
    for k, v in values.items():
        m = masks.get(k)
        m = torch.ones_like(v, dtype=torch.bool) if m is None else (m if m.dtype == torch.bool else m != 0)
        if m.shape != v.shape:
            raise ValueError(f"global_means: mask of {k!r} has shape {tuple(m.shape)}, its values {tuple(v.shape)}")
        v64 = v.to(device=device, dtype=torch.float64)
        m = m.to(device)
        sums += [torch.where(m, v64, torch.zeros((), dtype=torch.float64, device=device)).sum(),
                 m.sum().to(torch.float64)]
    totals = _all_reduce_sum(torch.stack(sums), group).tolist()  # (2K,): sum, count per key
    return {k: totals[2 * i] / totals[2 * i + 1] if totals[2 * i + 1] else 0.0 for i, k in enumerate(values)}


def sum_over_ranks(x: Tensor, group: Any = None) -> Tensor:
    """``x`` summed over the group (a copy; ``x`` itself unchanged)."""
    return _all_reduce_sum(x.detach().clone(), group)


def max_over_ranks(value: int, group: Any = None, device: torch.device | str = "cpu") -> int:
    t = torch.tensor([value], dtype=torch.long, device=device)
    if _active(group):
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def lockstep_batches(rows: Sequence[T], batch_size: int, group: Any = None,
                     device: torch.device | str = "cpu") -> list[tuple[list[T], float]]:
    """Split this rank's ``rows`` into micro-batches of ``batch_size``, as many on every rank: the
    largest count over the group. A rank with fewer rows repeats its first rows in the extra batches
    with weight 0 (forward and backward run, so FSDP2's collectives complete; the loss is multiplied by
    the weight, so they change nothing); a rank with no rows at all cannot, and raises. Returns
    ``[(rows, weight)]`` with weight 1.0 for real batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    own = math.ceil(len(rows) / batch_size)
    steps = max_over_ranks(own, group, device)
    if steps > 0 and not rows:
        raise ValueError("lockstep_batches: this rank has no rows while others do; give every rank at least one")
    out = [(list(rows[i * batch_size:(i + 1) * batch_size]), 1.0) for i in range(own)]
    out += [(list(rows[:batch_size]), 0.0) for _ in range(steps - own)]
    return out
