"""Paired t-test between two systems' per-query scores."""

import random

import pytest
from scipy import stats

from retrieval.significance import paired_t_test


def _scores(values, prefix="q"):
    return {f"{prefix}{i}": v for i, v in enumerate(values)}


def test_identical_scores_give_one():
    a = _scores([0.1, 0.5, 0.9, 0.3, 0.0])
    assert paired_t_test(a, dict(a)) == 1.0
    # scipy itself gives nan here; the function must not
    assert paired_t_test(_scores([0.0] * 5), _scores([0.0] * 5)) == 1.0


def test_clearly_better_system_is_significant():
    rng = random.Random(0)
    base = [rng.uniform(0.2, 0.6) for _ in range(50)]
    better = [b + 0.2 + rng.uniform(-0.05, 0.05) for b in base]
    p = paired_t_test(_scores(better), _scores(base))
    assert p < 0.01
    assert paired_t_test(_scores(base), _scores(better)) == pytest.approx(p)  # two-sided: symmetric


def test_noise_is_not_significant():
    a = _scores([0.5, 0.4, 0.6, 0.5])
    b = _scores([0.4, 0.5, 0.5, 0.6])  # differences +0.1 -0.1 +0.1 -0.1: mean 0
    assert paired_t_test(a, b) == pytest.approx(1.0)


def test_matches_scipy_ttest_rel():
    rng = random.Random(42)
    a = [rng.random() for _ in range(30)]
    b = [x + rng.gauss(0.03, 0.1) for x in a]
    expected = stats.ttest_rel(a, b).pvalue
    assert 0.0 < expected < 1.0
    assert paired_t_test(_scores(a), _scores(b)) == pytest.approx(expected, rel=1e-12)
    # insertion order of the dicts does not matter: queries are paired by id
    shuffled = list(_scores(b).items())
    rng.shuffle(shuffled)
    assert paired_t_test(_scores(a), dict(shuffled)) == pytest.approx(expected, rel=1e-12)


def test_only_common_queries_are_used():
    a = {"q1": 0.9, "q2": 0.7, "q3": 0.8, "q4": 0.6, "only_a": 0.0}
    b = {"q1": 0.5, "q2": 0.6, "q3": 0.4, "q4": 0.5, "only_b1": 1.0, "only_b2": 1.0}
    expected = stats.ttest_rel([0.9, 0.7, 0.8, 0.6], [0.5, 0.6, 0.4, 0.5]).pvalue
    assert paired_t_test(a, b) == pytest.approx(expected, rel=1e-12)
    # the extra queries do not change the result
    common = {"q1", "q2", "q3", "q4"}
    assert paired_t_test(a, b) == paired_t_test({q: a[q] for q in common}, {q: b[q] for q in common})


def test_identical_on_common_queries_gives_one_even_if_others_differ():
    a = {"q1": 0.3, "q2": 0.4, "x": 1.0}
    b = {"q1": 0.3, "q2": 0.4, "y": 0.0}
    assert paired_t_test(a, b) == 1.0


def test_fewer_than_two_common_queries_give_one():
    assert paired_t_test({}, {}) == 1.0
    assert paired_t_test({"q1": 1.0}, {"q1": 0.0}) == 1.0
    assert paired_t_test({"q1": 1.0, "q2": 1.0}, {"q3": 0.0, "q4": 0.0}) == 1.0


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")
def test_constant_nonzero_difference_is_significant():
    # zero variance of the differences but a non-zero mean: scipy gives t = inf, p = 0
    a = _scores([1.0, 2.0, 3.0, 4.0])
    b = _scores([0.0, 1.0, 2.0, 3.0])
    assert paired_t_test(a, b) == 0.0
