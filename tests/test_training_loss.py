"""The training loss a run reports, resumed or not (hand-computed values)."""

import pytest

from retrieval.models.base import whole_run_training_loss

# A Trainer's log history: a loss every logging_steps, evaluation entries between them.
LOG_HISTORY = [{"loss": 2.0, "step": 5}, {"eval_val_ndcg@10": 0.7, "step": 9}, {"loss": 1.0, "step": 10},
               {"loss": 0.6, "step": 15}]


def test_a_run_that_was_not_resumed_reports_the_trainer_loss():
    assert whole_run_training_loss(1.25, LOG_HISTORY, resumed=False) == 1.25


def test_a_resumed_run_reports_the_mean_of_every_logged_loss():
    # The Trainer's own figure after resuming at the last step is 0.0; the history holds the run's losses.
    assert whole_run_training_loss(0.0, LOG_HISTORY, resumed=True) == pytest.approx((2.0 + 1.0 + 0.6) / 3)


def test_a_resumed_run_with_nothing_logged_reports_no_loss():
    assert whole_run_training_loss(0.0, [{"eval_val_ndcg@10": 0.7}], resumed=True) is None
