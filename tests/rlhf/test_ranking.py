"""llama2_lightning.rlhf.ranking against values worked out by hand (in the comments) or by
independent plain-Python loops; never against the function under test itself."""

from __future__ import annotations

import math

import pytest
import torch
from approx import close

from llama2_lightning.rlhf.ranking import MARGINS, margin_for, ranking_loss

# --- reward-model ranking loss ----------------------------------------------------------------


def softplus(x: float) -> float:  # -log sigmoid(-x)
    return math.log1p(math.exp(x))


R_C = torch.tensor([2.0, 0.5, 1.0])
R_R = torch.tensor([1.0, 1.0, 1.0])
LABELS = ["significantly_better", "better", None]


def test_margin_tables():
    close(margin_for(LABELS, "small"), [1.0, 2.0 / 3.0, 0.0])
    close(margin_for(LABELS, "large"), [3.0, 2.0, 0.0])
    close(margin_for(LABELS, "none"), [0.0, 0.0, 0.0])
    assert MARGINS["small"]["slightly_better"] == pytest.approx(1 / 3) and MARGINS["large"]["negligibly_better"] == 0.0


def test_margin_for_errors_name_label_and_allowed():
    allowed = "significantly_better, better, slightly_better, negligibly_better"
    with pytest.raises(ValueError, match=rf"'much_better' at index 1; allowed: {allowed}"):
        margin_for(["better", "much_better"], "small")
    with pytest.raises(ValueError, match="small, large, none"):
        margin_for(["better"], "huge")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("table", "gaps"),
    [
        # gap = r_c - r_r - m
        ("small", [2.0 - 1.0 - 1.0, 0.5 - 1.0 - 2.0 / 3.0, 0.0]),
        ("large", [2.0 - 1.0 - 3.0, 0.5 - 1.0 - 2.0, 0.0]),
        ("none", [1.0, -0.5, 0.0]),
    ],
)
def test_ranking_loss_by_hand(table, gaps):
    expected = sum(softplus(-g) for g in gaps) / 3  # -log sigmoid(g) = log(1 + e^-g)
    close(ranking_loss(R_C, R_R, margin_for(LABELS, table)), expected, atol=1e-6)


def test_ranking_loss_zero_margin_is_bradley_terry_and_stable():
    # margin 0 / None: plain Bradley-Terry, -log sigmoid(r_c - r_r); gap 0 gives ln 2
    close(ranking_loss(torch.tensor([1.0]), torch.tensor([1.0])), 0.6931471805599453)
    close(ranking_loss(R_C, R_R), ranking_loss(R_C, R_R, torch.zeros(3)))
    close(ranking_loss(R_C, R_R), (softplus(-1.0) + softplus(0.5) + math.log(2.0)) / 3, atol=1e-6)
    # a huge wrong-way gap stays finite: -log sigmoid(-1000) = 1000
    close(ranking_loss(torch.tensor([0.0]), torch.tensor([1000.0])), 1000.0)
