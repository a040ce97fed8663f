"""compare_systems, breakdowns and turn buckets, against hand-computed values."""

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
    # Per-query differences +1/2 and -1/2: mean 0, t = 0, two-sided p = 1.
    assert report["a_vs_b_p_value"]["mrr_at_10"] == pytest.approx(1.0)
    assert not any("." in key for key in report)


def test_compare_systems_needs_judged_queries():
    with pytest.raises(ValueError, match="no queries"):
        compare_systems({}, {"a": RUN_A})


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
