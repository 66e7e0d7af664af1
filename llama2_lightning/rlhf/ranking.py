"""The reward models' binary ranking loss with a preference-rating margin (section 3.2.2, eq. 2).

    L_ranking = -log(sigmoid(r_theta(x, y_c) - r_theta(x, y_r) - m(r)))

Annotators rated each pair as significantly / better / slightly / negligibly better (or unsure);
the margin m(r) asks the reward model for a wider score gap on clearer preferences. The paper's
appendix A.3.3 ablates two scales, ``"small"`` and ``"large"`` below.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

MarginTable = Literal["small", "large", "none"]

MARGINS: dict[str, dict[str, float]] = {
    "small": {"significantly_better": 1.0, "better": 2.0 / 3.0, "slightly_better": 1.0 / 3.0, "negligibly_better": 0.0},
    "large": {"significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0, "negligibly_better": 0.0},
}


def margin_for(labels: list[str | None], table: MarginTable = "small") -> Tensor:
    """Margins m(r) for a batch of preference labels (section 3.2.2, appendix A.3.3), as a (N,) float32 tensor.

    ``None`` (no rating, e.g. data from open-source preference sets) gives margin 0, i.e. plain
    Bradley-Terry. ``table="none"`` gives all zeros but still validates the labels, so a typo in the
    data is caught whichever table a config picks.
    """
    if table not in get_args(MarginTable):
        raise ValueError(f"margin_for: unknown margin table {table!r}; allowed: {', '.join(get_args(MarginTable))}")
    allowed = MARGINS["small"]  # both tables share the labels
    margins = []
    for i, label in enumerate(labels):
        if label is None:
            margins.append(0.0)
            continue
        if label not in allowed:
            raise ValueError(
                f"margin_for: unknown preference label {label!r} at index {i}; allowed: {', '.join(allowed)} or None"
            )
        margins.append(0.0 if table == "none" else MARGINS[table][label])
    return torch.tensor(margins, dtype=torch.float32)


def ranking_loss(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | None = None) -> Tensor:
    """Mean of ``-log sigmoid(r_c - r_r - m)`` over pairs (section 3.2.2, eq. 2), a scalar.

    r_chosen, r_rejected: (N,) scalar scores of the preferred and rejected responses; margin: (N,)
    or None for 0 (plain Bradley-Terry). ``F.logsigmoid`` keeps the loss finite and its gradient
    exact for large negative gaps, where ``log(sigmoid(.))`` would underflow to ``-inf``.
    """
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(
            f"ranking_loss: r_chosen {tuple(r_chosen.shape)} and r_rejected {tuple(r_rejected.shape)} differ in shape"
        )
    gap = r_chosen - r_rejected
    if margin is not None:
        if margin.shape != gap.shape:
            raise ValueError(f"ranking_loss: margin {tuple(margin.shape)} must match the scores {tuple(gap.shape)}")
        gap = gap - margin.to(device=gap.device, dtype=gap.dtype)
    return -F.logsigmoid(gap).mean()
