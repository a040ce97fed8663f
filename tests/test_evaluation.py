"""compare_systems, breakdowns and turn buckets, against hand-computed values."""

import math
import random

import pytest

from retrieval.evaluation import breakdown, compare_systems, group_queries, turn_bucket

QRELS = {"q1": {"d1": 1}, "q2": {"d2": 1}}
# q1: a finds d1 at rank 1 (RR 1), b at rank 2 (RR 1/2); q2: a at rank 2 (1/2), b at rank 1 (1).
RUN_A = {"q1": {"d1": 2.0, "x": 1.0}, "q2": {"x": 2.0, "d2": 1.0}}
RUN_B = {"q1": {"x": 2.0, "d1": 1.0}, "q2": {"d2": 2.0, "x": 1.0}}


def test_compare_systems_means_deltas_and_p_values():
    report = compare_systems(QRELS, {"a": RUN_A, "b": RUN_B}, metrics=["mrr_at_10", "recall_at_1"],
                             comparisons=[("a", "b")])
    assert report["num_queries"] == 2
    assert report["a"] == {"mrr_at_10": 0.75, "recall_at_1": 0.5}
    assert report["b"] == {"mrr_at_10": 0.75, "recall_at_1": 0.5}
    assert report["a_minus_b"] == {"mrr_at_10": 0.0, "recall_at_1": 0.0}
    # Per-query differences (+1/2, -1/2) for MRR, (+1, -1) for recall@1: mean 0, so every sign assignment's
    # |mean| >= 0 (randomisation p = 1), t = 0 (t-test p = 1), and Holm leaves 1 at 1.
    for key in ("a_vs_b_p_value", "a_vs_b_p_unadjusted", "a_vs_b_t_test_p"):
        assert report[key] == pytest.approx({"mrr_at_10": 1.0, "recall_at_1": 1.0}), key
    # Bootstrap of 2 queries: resampled mean difference is d1, (d1 + d2)/2 or d2 with probability 1/4, 1/2,
    # 1/4, so the 95% interval runs from the smaller to the larger difference.
    assert report["a_minus_b_ci_low"] == {"mrr_at_10": -0.5, "recall_at_1": -1.0}
    assert report["a_minus_b_ci_high"] == {"mrr_at_10": 0.5, "recall_at_1": 1.0}
    assert not any("." in key for key in report)


# Four queries, one relevant document each. "good" ranks it first everywhere; "bad" second everywhere;
# "mixed" first for q1 and q2, second for q3 and q4.
QRELS_4 = {f"q{i}": {f"d{i}": 1} for i in range(1, 5)}
GOOD = {q: {f"d{q[1:]}": 2.0, "x": 1.0} for q in QRELS_4}
BAD = {q: {"x": 2.0, f"d{q[1:]}": 1.0} for q in QRELS_4}
MIXED = {q: GOOD[q] if q in ("q1", "q2") else BAD[q] for q in QRELS_4}


def _walk(report, path=()):
    for key, value in report.items():
        yield path + (key,), value
        if isinstance(value, dict):
            yield from _walk(value, path + (key,))


def test_compare_systems_holm_adjusts_over_every_comparison_and_metric():
    runs = {"good": GOOD, "bad": BAD, "mixed": MIXED}
    report = compare_systems(QRELS_4, runs, metrics=["mrr_at_10", "recall_at_1"],
                             comparisons=[("good", "bad"), ("good", "mixed")])
    assert report["good"] == {"mrr_at_10": 1.0, "recall_at_1": 1.0}
    assert report["bad"] == {"mrr_at_10": 0.5, "recall_at_1": 0.0}
    assert report["mixed"] == {"mrr_at_10": 0.75, "recall_at_1": 0.5}
    assert report["good_minus_bad"] == {"mrr_at_10": 0.5, "recall_at_1": 1.0}
    assert report["good_minus_mixed"] == {"mrr_at_10": 0.25, "recall_at_1": 0.5}

    # Randomisation, exact over 2^4 = 16 sign assignments:
    # good - bad: differences all equal (1/2 for MRR, 1 for recall@1), only all-plus and all-minus reach the
    #   observed |sum|: p = 2/16 = 0.125.
    # good - mixed: differences (0, 0, d, d): |sum| = 2d when the two d's share a sign, 2 of their 4 sign
    #   pairs, times 4 for the zeros' signs: p = 8/16 = 0.5.
    assert report["good_vs_bad_p_unadjusted"] == {"mrr_at_10": 0.125, "recall_at_1": 0.125}
    assert report["good_vs_mixed_p_unadjusted"] == {"mrr_at_10": 0.5, "recall_at_1": 0.5}
    # Holm over the m = 4 p-values, sorted 0.125, 0.125, 0.5, 0.5, times 4, 3, 2, 1: 0.5, 0.375, 1.0, 0.5;
    # running maximum: 0.5, 0.5, 1.0, 1.0.
    assert report["good_vs_bad_p_value"] == {"mrr_at_10": 0.5, "recall_at_1": 0.5}
    assert report["good_vs_mixed_p_value"] == {"mrr_at_10": 1.0, "recall_at_1": 1.0}

    # t-test: good - bad has zero-variance non-zero differences, t = inf, p = 0. good - mixed MRR differences
    # (0, 0, 1/2, 1/2): mean 1/4, sd 1/sqrt(12), t = sqrt(3) with 3 df: p = 1/2 - 1/pi (see
    # tests/test_significance.py); recall@1 (0, 0, 1, 1) is the same scaled by 2, so the same t and p.
    assert report["good_vs_bad_t_test_p"] == {"mrr_at_10": 0.0, "recall_at_1": 0.0}
    assert report["good_vs_mixed_t_test_p"] == pytest.approx({"mrr_at_10": 0.5 - 1 / math.pi,
                                                              "recall_at_1": 0.5 - 1 / math.pi}, rel=1e-12)

    # Bootstrap: good - bad differences are constant, a point interval. good - mixed (0, 0, d, d): the
    # resampled mean is d k / 4 with k ~ Binomial(4, 1/2), CDF 1/16, 5/16, 11/16, 15/16, 1; the 2.5% and
    # 97.5% quantiles are k = 0 and k = 4 (each ~15 Monte Carlo standard errors from a CDF step).
    assert report["good_minus_bad_ci_low"] == report["good_minus_bad_ci_high"] == {"mrr_at_10": 0.5,
                                                                                   "recall_at_1": 1.0}
    assert report["good_minus_mixed_ci_low"] == {"mrr_at_10": 0.0, "recall_at_1": 0.0}
    assert report["good_minus_mixed_ci_high"] == {"mrr_at_10": 0.5, "recall_at_1": 1.0}

    assert report["significance"] == {"test": "paired_randomization", "correction": "holm", "comparisons": 4,
                                      "system_pairs": 2, "samples": 10000, "ci_level": 0.95}
    assert set(report) == {"num_queries", "good", "bad", "mixed", "significance"} | {
        f"{a}_{suffix}" for a in ("good_minus_bad", "good_minus_mixed") for suffix in ("ci_low", "ci_high")} | {
        "good_minus_bad", "good_minus_mixed"} | {
        f"good_vs_{b}_{suffix}" for b in ("bad", "mixed") for suffix in ("p_value", "p_unadjusted", "t_test_p")}
    # dvc flattens nested keys with dots and plots numbers: keys without dots, numbers outside "significance"
    for path, value in _walk(report):
        assert "." not in path[-1], path
        if not isinstance(value, dict) and path[0] != "significance":
            assert isinstance(value, (int, float)) and not isinstance(value, bool), path


def test_compare_systems_is_deterministic_and_seeded():
    rng = random.Random(0)
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(40)}  # 40 queries: Monte Carlo, not exact
    runs = {name: {q: {f"d{q[1:]}": rng.random(), "x": rng.random(), "y": rng.random()} for q in qrels}
            for name in ("a", "b")}
    kwargs = dict(metrics=["mrr_at_10"], comparisons=[("a", "b")])
    first = compare_systems(qrels, runs, **kwargs)
    assert compare_systems(qrels, runs, **kwargs) == first
    other_seed = compare_systems(qrels, runs, seed=1, **kwargs)
    assert other_seed["a_vs_b_p_unadjusted"] != first["a_vs_b_p_unadjusted"]
    assert other_seed["a_minus_b"] == first["a_minus_b"]
    smaller = compare_systems(qrels, runs, samples=500, ci_level=0.9, **kwargs)
    assert smaller["significance"]["samples"] == 500 and smaller["significance"]["ci_level"] == 0.9


def test_compare_systems_without_comparisons_has_no_significance_section():
    report = compare_systems(QRELS, {"a": RUN_A, "b": RUN_B}, metrics=["mrr_at_10"])
    assert report == {"num_queries": 2, "a": {"mrr_at_10": 0.75}, "b": {"mrr_at_10": 0.75}}


def test_compare_systems_needs_judged_queries():
    with pytest.raises(ValueError, match="no queries"):
        compare_systems({}, {"a": RUN_A})


@pytest.mark.parametrize("runs, comparisons, message", [
    ({"a": RUN_A}, [("a", "missing")], "'missing'"),
    ({"a": RUN_A, "b": RUN_B}, [("a", "b"), ("a", "b")], "twice"),
    ({"a": RUN_A, "b": RUN_B}, [("a", "b", "a")], "pair"),
    ({"a.1": RUN_A, "b": RUN_B}, [("a.1", "b")], "'a.1'"),
])
def test_compare_systems_rejects_bad_comparisons(runs, comparisons, message):
    with pytest.raises(ValueError, match=message):
        compare_systems(QRELS, runs, metrics=["mrr_at_10"], comparisons=comparisons)


@pytest.mark.parametrize("turn, bucket", [(1, "turn_1"), (2, "turn_2"), (3, "turn_3_5"), (5, "turn_3_5"),
                                          (6, "turn_6_plus"), (12, "turn_6_plus"), ("4", "turn_3_5")])
def test_turn_buckets(turn, bucket):
    assert turn_bucket(turn) == bucket


def test_breakdown_by_turn_and_by_field():
    queries = {"q1": {"text": "a", "turn": 1, "answerability": ["PARTIAL"]}, "q2": {"text": "b", "turn": 7,
               "question_type": ["Factoid", "How.to"]},
               "q3": {"text": "c"}}
    by_turn = breakdown(QRELS, {"a": RUN_A, "b": RUN_B}, group_queries(queries, "turn"), metrics=["mrr_at_10"])
    assert by_turn == {"turn_1": {"num_queries": 1, "a": {"mrr_at_10": 1.0}, "b": {"mrr_at_10": 0.5}},
                       "turn_6_plus": {"num_queries": 1, "a": {"mrr_at_10": 0.5}, "b": {"mrr_at_10": 1.0}}}
    # Field values become keys without dots or brackets; queries without the field are left out.
    assert group_queries(queries, "answerability") == {"q1": "PARTIAL"}
    assert group_queries(queries, "question_type") == {"q2": "Factoid+How_to"}
