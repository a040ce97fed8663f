"""The MNRL scale (1 / temperature) calibration: hand-computed optima of tiny score batches."""

import math

import pytest
import torch

from retrieval.models.st_training import calibrated_mnrl_scale, mnrl_loss


def test_mnrl_loss_by_hand():
    # Rows are queries, candidate i is query i's positive.
    # Query 0: positive 2, other candidate 0 -> log(1 + e^-2s); query 1: positive 0, other 1 -> log(1 + e^s).
    scores = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    assert mnrl_loss(scores, 1.0) == pytest.approx((math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))) / 2)


def test_the_optimum_of_one_right_and_one_wrong_query():
    """Loss(s) = [log(1 + e^-2s) + log(1 + e^s)] / 2; its derivative vanishes where x = e^s solves x^3 - x - 2 = 0."""
    scores = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    root = 1.5213797068045676  # the real root of x^3 - x - 2
    assert root ** 3 - root - 2 == pytest.approx(0, abs=1e-12)
    assert calibrated_mnrl_scale([scores]) == pytest.approx(math.log(root), rel=1e-4)


def test_the_optimum_is_over_all_batches_together():
    wrong = torch.tensor([[0.0, 1.0], [1.0, 0.0]])   # both queries prefer the other candidate by 1: loss falls as s -> 0
    right = torch.tensor([[3.0, 0.0], [0.0, 3.0]])   # both right by 3: loss falls as s grows
    together = calibrated_mnrl_scale([right, wrong])
    # The optimum of the summed loss, by brute force over a fine grid.
    grid = [i / 10000 for i in range(1, 20000)]
    brute = min(grid, key=lambda s: mnrl_loss(right, s) + mnrl_loss(wrong, s))
    assert together == pytest.approx(brute, abs=2e-4)


def test_a_model_that_ranks_every_positive_first_gets_a_large_scale():
    """No optimum: the loss log(1 + e^-2s) falls as the scale s grows, until it is exactly 0 in float64. That happens
    once 1 + e^-2s rounds to 1, i.e. e^-2s <= 2^-53 (half an ulp of 1): s >= 53 ln 2 / 2 = 18.3684. On the flat part
    the search keeps the lower side, so it stops at that edge."""
    scores = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    assert calibrated_mnrl_scale([scores], high=50.0) == pytest.approx(53 * math.log(2) / 2, rel=1e-6)


def test_no_batches_is_an_error():
    with pytest.raises(ValueError, match="no score batches"):
        calibrated_mnrl_scale([])
