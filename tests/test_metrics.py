"""Ranking metrics: hand-computed values on tiny runs, and agreement with trec_eval (through pytrec_eval)."""

import math
import random

import pytest
import pytrec_eval  # trec_eval's own code: a declared test dependency, so a missing one fails

from retrieval.metrics import (
    DEFAULT_METRICS,
    evaluate,
    map_at,
    mrr_at,
    ndcg_at,
    parse_metric,
    per_query,
    ranked,
    recall_at,
)

LOG2_3 = math.log2(3)  # discount at rank 2
LOG2_5 = math.log2(5)  # discount at rank 4

# q1: graded relevance; d3 is judged but grade 0, so it is NOT relevant. d5 is unjudged. Relevant: d1(2), d2(1), d4(1).
# q2: a tie that only the doc-id tie-break resolves.
# q3: judged but missing from the run -> every metric 0.
# q9: in the run but not in the qrels -> ignored.
QRELS = {
    "q1": {"d1": 2, "d2": 1, "d3": 0, "d4": 1},
    "q2": {"a": 1},
    "q3": {"x": 1},
}
RUN = {
    "q1": {"d3": 0.9, "d1": 0.8, "d5": 0.7, "d2": 0.6, "d4": 0.1},  # ranking: d3 d1 d5 d2 d4
    "q2": {"a": 0.5, "b": 0.5, "z": 0.2},  # tie a/b broken by doc id descending: b a z
    "q9": {"d1": 1.0},
}


def approx(x):
    return pytest.approx(x, abs=1e-12)


# ---------------------------------------------------------------- ranked


def test_ranked_orders_by_score_then_doc_id_descending():
    assert ranked({"a": 0.1, "b": 0.9, "c": 0.5}) == ["b", "c", "a"]
    assert ranked({"a": 1.0, "c": 1.0, "b": 1.0}) == ["c", "b", "a"]
    # doc ids compare as strings (as trec_eval's strcmp does): "d9" > "d10" > "d1"
    assert ranked({"d1": 1.0, "d10": 1.0, "d9": 1.0, "d2": 2.0}) == ["d2", "d9", "d10", "d1"]
    assert ranked({}) == []


def test_ranked_handles_negative_scores():
    assert ranked({"a": -1.0, "b": -0.5, "c": 0.0}) == ["c", "b", "a"]


# ---------------------------------------------------------------- single-query functions (q1)

Q1_RANKING = ["d3", "d1", "d5", "d2", "d4"]
Q1_GRADES = QRELS["q1"]


def test_q1_ranking():
    assert ranked(RUN["q1"]) == Q1_RANKING


def test_ndcg_graded_hand_computed():
    # Ranking d3(0) d1(2) d5(-) d2(1) d4(1); gains = grades, discount log2(rank + 1).
    # DCG@2  = 0/1 + 2/log2(3)
    # IDCG@2 = 2/1 + 1/log2(3)                       (ideal grades 2, 1, 1 cut to 2)
    assert ndcg_at(Q1_RANKING, Q1_GRADES, 2) == approx((2 / LOG2_3) / (2 + 1 / LOG2_3))  # = 0.5578...
    # DCG@5  = 2/log2(3) + 1/log2(5) + 1/log2(6)
    #        = 1.2619 + 0.4307 + 0.3869 = 2.0794
    # IDCG@5 = 2/1 + 1/log2(3) + 1/log2(4) = 2 + 0.6309 + 0.5 = 3.1309
    dcg5 = 2 / LOG2_3 + 1 / LOG2_5 + 1 / math.log2(6)
    idcg5 = 2 + 1 / LOG2_3 + 1 / 2
    assert ndcg_at(Q1_RANKING, Q1_GRADES, 5) == approx(dcg5 / idcg5)  # = 2.0794 / 3.1309 = 0.6641...
    assert ndcg_at(Q1_RANKING, Q1_GRADES, 5) == approx(0.6641442115010364)
    # only the grade-0 doc in the top 1 -> 0
    assert ndcg_at(Q1_RANKING, Q1_GRADES, 1) == 0.0


def test_ndcg_perfect_ranking_is_one_and_grades_matter():
    grades = {"a": 2, "b": 1}
    assert ndcg_at(["a", "b"], grades, 10) == approx(1.0)
    # swapping the grade-2 and grade-1 docs: DCG = 1 + 2/log2(3), IDCG = 2 + 1/log2(3)
    assert ndcg_at(["b", "a"], grades, 10) == approx((1 + 2 / LOG2_3) / (2 + 1 / LOG2_3))
    assert ndcg_at(["b", "a"], grades, 10) < 1.0


def test_recall_hand_computed():
    # 3 relevant docs (d3 has grade 0). Top 3 = d3 d1 d5 -> 1 relevant; top 4 adds d2; top 5 adds d4.
    assert recall_at(Q1_RANKING, Q1_GRADES, 1) == 0.0
    assert recall_at(Q1_RANKING, Q1_GRADES, 3) == approx(1 / 3)
    assert recall_at(Q1_RANKING, Q1_GRADES, 4) == approx(2 / 3)
    assert recall_at(Q1_RANKING, Q1_GRADES, 5) == approx(1.0)
    assert recall_at(Q1_RANKING, Q1_GRADES, 100) == approx(1.0)


def test_mrr_hand_computed():
    # first relevant doc is d1 at rank 2 (d3 at rank 1 has grade 0)
    assert mrr_at(Q1_RANKING, Q1_GRADES, 1) == 0.0
    assert mrr_at(Q1_RANKING, Q1_GRADES, 2) == approx(1 / 2)
    assert mrr_at(Q1_RANKING, Q1_GRADES, 10) == approx(1 / 2)


def test_map_hand_computed():
    # hits at ranks 2, 4, 5 -> precisions 1/2, 2/4, 3/5; divided by all 3 relevant docs
    assert map_at(Q1_RANKING, Q1_GRADES, 5) == approx((1 / 2 + 2 / 4 + 3 / 5) / 3)  # = 0.5333...
    # cut at 4: the hit at rank 5 is lost but the denominator stays 3
    assert map_at(Q1_RANKING, Q1_GRADES, 4) == approx((1 / 2 + 2 / 4) / 3)  # = 0.3333...
    assert map_at(Q1_RANKING, Q1_GRADES, 1) == 0.0


def test_grade_zero_only_or_no_judgements_scores_zero():
    for function in (ndcg_at, recall_at, mrr_at, map_at):
        assert function(["a", "b"], {"a": 0, "b": 0}, 10) == 0.0
        assert function(["a", "b"], {}, 10) == 0.0
        assert function([], {"a": 2}, 10) == 0.0


# ---------------------------------------------------------------- per_query / evaluate


def test_per_query_covers_exactly_the_judged_queries_sorted():
    scores = per_query(QRELS, RUN, "mrr_at_10")
    assert list(scores) == ["q1", "q2", "q3"]  # q9 (not judged) ignored, q3 (not in run) present
    # q1: first relevant at rank 2. q2: ranking b a z, so "a" is at rank 2 (1.0 if the tie broke ascending).
    assert scores == {"q1": approx(1 / 2), "q2": approx(1 / 2), "q3": 0.0}


def test_tie_break_affects_ndcg():
    # q2: ranking b a z; DCG@10 = 1/log2(3), IDCG = 1
    assert per_query(QRELS, RUN, "ndcg_at_10")["q2"] == approx(1 / LOG2_3)  # = 0.6309...
    assert per_query(QRELS, RUN, "ndcg_at_1")["q2"] == 0.0


def test_evaluate_means_over_judged_queries_hand_computed():
    result = evaluate(QRELS, RUN, ["mrr_at_10", "recall_at_3", "map_at_5", "ndcg_at_5", "recall_at_1"])
    assert list(result) == ["mrr_at_10", "recall_at_3", "map_at_5", "ndcg_at_5", "recall_at_1"]
    # per query (q1, q2, q3), q3 missing from the run counts 0:
    # mrr@10:    1/2, 1/2, 0                          -> 1/3
    # recall@3:  1/3, 1,   0                          -> 4/9
    # map@5:     (1/2+2/4+3/5)/3, 1/2, 0              -> (0.5333.. + 0.5)/3
    # ndcg@5:    0.66414..., 1/log2(3), 0
    # recall@1:  0 (d3 is grade 0), 0 (b first), 0   -> 0
    assert result["mrr_at_10"] == approx(1 / 3)
    assert result["recall_at_3"] == approx((1 / 3 + 1) / 3)
    assert result["map_at_5"] == approx(((1 / 2 + 2 / 4 + 3 / 5) / 3 + 1 / 2) / 3)
    assert result["ndcg_at_5"] == approx((0.6641442115010364 + 1 / LOG2_3) / 3)
    assert result["recall_at_1"] == 0.0


def test_evaluate_default_metrics():
    result = evaluate(QRELS, RUN)
    assert list(result) == DEFAULT_METRICS
    # Per query (q1, q2, q3). q1 ranks 5 docs and q2 3, so every cut-off >= 5 sees the whole ranking:
    # ndcg@10:   0.66414... (= ndcg@5, above), 1/log2(3), 0
    # recall@5, @20, @100: 1, 1, 0                    -> 2/3 each
    # mrr@10:    1/2, 1/2, 0                          -> 1/3
    # map@100:   (1/2 + 2/4 + 3/5)/3, 1/2, 0
    assert result == {
        "ndcg_at_10": approx((0.6641442115010364 + 1 / LOG2_3) / 3),  # = 0.4317...
        "recall_at_5": approx(2 / 3),
        "recall_at_20": approx(2 / 3),
        "recall_at_100": approx(2 / 3),
        "mrr_at_10": approx(1 / 3),
        "map_at_100": approx(((1 / 2 + 2 / 4 + 3 / 5) / 3 + 1 / 2) / 3),  # = 0.3444...
    }


def test_evaluate_ignores_run_only_queries():
    with_extra = {**RUN, "q9": {"x": 100.0}, "q10": {"a": 1.0}}
    assert evaluate(QRELS, with_extra) == evaluate(QRELS, RUN)


def test_evaluate_without_qrels_fails():
    with pytest.raises(ValueError, match="no queries"):
        evaluate({}, RUN)


def test_empty_run_scores_zero():
    assert set(evaluate(QRELS, {}).values()) == {0.0}


# ---------------------------------------------------------------- parse_metric


def test_parse_metric():
    assert parse_metric("ndcg_at_10") == (ndcg_at, 10)
    assert parse_metric("recall_at_100") == (recall_at, 100)
    assert parse_metric("mrr_at_10") == (mrr_at, 10)
    assert parse_metric("map_at_1000") == (map_at, 1000)


@pytest.mark.parametrize(
    "name",
    ["ndcg@10", "ndcg_cut_10", "ndcg.10", "precision_at_10", "NDCG_at_10", "ndcg_at_", "ndcg_at_x", "ndcg_at_-1",
     "ndcg_at_1.5", "ndcg_at_10_at_5", "ndcg", "", "_at_10"],
)
def test_parse_metric_rejects_bad_names(name):
    with pytest.raises(ValueError, match="unknown metric"):
        parse_metric(name)


def test_bad_metric_name_fails_in_evaluate_and_per_query():
    with pytest.raises(ValueError, match=r"unknown metric 'p_at_10'.*ndcg_at_10"):
        evaluate(QRELS, RUN, ["ndcg_at_10", "p_at_10"])
    with pytest.raises(ValueError, match="unknown metric"):
        per_query(QRELS, RUN, "ndcg@10")


# ---------------------------------------------------------------- agreement with trec_eval


@pytest.fixture(scope="module")
def random_qrels_run():
    rng = random.Random(1234)
    docs = [f"d{i}" for i in range(60)]  # d0..d59: string order differs from numeric order
    qrels, run = {}, {}
    for q in range(20):
        qid = f"q{q}"
        judged = rng.sample(docs, rng.randint(3, 15))
        qrels[qid] = {d: rng.choice([0, 0, 1, 1, 2]) for d in judged}
        retrieved = rng.sample(docs, 50)  # some judged docs are not retrieved
        # scores rounded to one decimal: many ties, resolved by doc id
        run[qid] = {d: round(rng.uniform(0, 3), 1) for d in retrieved}
    qrels["q0"] = {d: 0 for d in qrels["q0"]}  # a query with judgements but no relevant doc
    qrels["q1"].setdefault("d0", 2)  # make sure at least one grade-2 doc exists somewhere
    return qrels, run


def test_matches_pytrec_eval(random_qrels_run):
    qrels, run = random_qrels_run
    measures = {"ndcg_cut.5", "ndcg_cut.10", "recall.5", "recall.20", "recall.100", "map_cut.10", "map_cut.100",
                "recip_rank"}
    expected = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    assert sorted(expected) == sorted(qrels)
    pairs = {"ndcg_at_5": "ndcg_cut_5", "ndcg_at_10": "ndcg_cut_10", "recall_at_5": "recall_5",
             "recall_at_20": "recall_20", "recall_at_100": "recall_100", "map_at_10": "map_cut_10",
             "map_at_100": "map_cut_100", "mrr_at_1000": "recip_rank"}  # 50 docs/query: mrr uncut == recip_rank
    for ours, theirs in pairs.items():
        scores = per_query(qrels, run, ours)
        for qid in qrels:
            assert scores[qid] == pytest.approx(expected[qid][theirs], abs=1e-9), (ours, qid)
        mean = sum(expected[qid][theirs] for qid in qrels) / len(qrels)
        assert evaluate(qrels, run, [ours])[ours] == pytest.approx(mean, abs=1e-9)

    # MRR@10 equals recip_rank when the first relevant doc is in the top 10, else 0
    mrr10 = per_query(qrels, run, "mrr_at_10")
    checked_inside = checked_outside = 0
    for qid in qrels:
        rr = expected[qid]["recip_rank"]
        if rr >= 1 / 10:
            assert mrr10[qid] == pytest.approx(rr, abs=1e-9)
            checked_inside += 1
        else:
            assert mrr10[qid] == 0.0
            checked_outside += 1
    assert checked_inside > 0 and checked_outside > 0  # both branches exercised with this seed


def test_matches_pytrec_eval_with_missing_query(random_qrels_run):
    qrels, run = random_qrels_run
    partial = {qid: docs for qid, docs in run.items() if qid != "q5"}
    expected = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(partial)
    assert "q5" not in expected  # trec_eval skips it; we score it 0 (as trec_eval -c does)
    scores = per_query(qrels, partial, "ndcg_at_10")
    assert scores["q5"] == 0.0
    for qid in expected:
        assert scores[qid] == pytest.approx(expected[qid]["ndcg_cut_10"], abs=1e-9)
