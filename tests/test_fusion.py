"""Hybrid fusion of runs: RRF and weighted sums, hand-computed, and agreeing with ranx where ranx is well defined."""

import math
import random
import re

import pytest

from retrieval.fusion import UndefinedFusion, fuse, fuse_systems, rrf, weighted_sum
from retrieval.metrics import ranked

# q1 is in both runs; d3 is only in SPARSE and d4 only in DENSE. q2 is only in SPARSE.
# DENSE ties d1 and d4 at 8.0: trec_eval order (doc id descending) ranks d4 2nd and d1 3rd.
SPARSE = {"q1": {"d1": 3.0, "d2": 2.0, "d3": 1.0}, "q2": {"d4": 0.9, "d5": 0.5}}
DENSE = {"q1": {"d2": 10.0, "d1": 8.0, "d4": 8.0}}


def test_rrf_hand_computed():
    fused = rrf([SPARSE, DENSE], k=60)
    # Ranks (1-based):  SPARSE q1: d1 1, d2 2, d3 3;  DENSE q1: d2 1, d4 2, d1 3;  SPARSE q2: d4 1, d5 2.
    assert fused["q1"] == pytest.approx({
        "d1": 1 / (60 + 1) + 1 / (60 + 3),  # 0.032266
        "d2": 1 / (60 + 2) + 1 / (60 + 1),  # 0.032522
        "d3": 1 / (60 + 3),                 # 0.015873, only in SPARSE
        "d4": 1 / (60 + 2),                 # 0.016129, only in DENSE
    })
    assert fused["q2"] == pytest.approx({"d4": 1 / (60 + 1), "d5": 1 / (60 + 2)})  # only in SPARSE
    assert list(fused) == ["q1", "q2"]
    assert list(fused["q1"]) == ["d2", "d1", "d4", "d3"] == ranked(fused["q1"])  # output is in trec order


def test_rrf_k_and_ties_in_the_fused_scores():
    # Two runs in opposite orders: with ranks 1 and 2 swapped, both docs score 1/(k+1) + 1/(k+2), a tie that the
    # output's trec order breaks by doc id descending.
    fused = rrf([{"q": {"a": 2.0, "b": 1.0}}, {"q": {"a": 1.0, "b": 2.0}}], k=0)
    assert fused == {"q": pytest.approx({"a": 1 / 1 + 1 / 2, "b": 1 / 2 + 1 / 1})}
    assert list(fused["q"]) == ["b", "a"]


def test_weighted_sum_min_max_hand_computed():
    fused = weighted_sum([SPARSE, DENSE], weights=[0.3, 0.7], norm="min-max")
    # min-max per query and run, (s - min) / (max - min):
    #   SPARSE q1 (min 1, max 3):  d1 1.0, d2 0.5, d3 0.0     DENSE q1 (min 8, max 10): d2 1.0, d1 0.0, d4 0.0
    #   SPARSE q2 (min 0.5, max 0.9): d4 1.0, d5 0.0
    assert fused["q1"] == pytest.approx({
        "d1": 0.3 * 1.0 + 0.7 * 0.0,  # 0.30
        "d2": 0.3 * 0.5 + 0.7 * 1.0,  # 0.85
        "d3": 0.3 * 0.0 + 0.7 * 0.0,  # 0.00, missing from DENSE: DENSE's minimum, 0
        "d4": 0.3 * 0.0 + 0.7 * 0.0,  # 0.00, missing from SPARSE: SPARSE's minimum, 0
    })
    assert fused["q2"] == pytest.approx({"d4": 0.3, "d5": 0.0})
    assert list(fused["q1"]) == ["d2", "d1", "d4", "d3"]  # d4 and d3 tie at 0: doc id descending


def test_weighted_sum_other_normalisations():
    runs = [{"q": {"a": 4.0, "b": 2.0}}, {"q": {"a": 1.0, "b": 3.0}}]
    assert weighted_sum(runs, [1.0, 1.0], norm=None)["q"] == pytest.approx({"a": 5.0, "b": 5.0})
    # max: s / max -> a 4/4 + 1/3, b 2/4 + 3/3
    assert weighted_sum(runs, [1.0, 1.0], norm="max")["q"] == pytest.approx({"a": 1 + 1 / 3, "b": 0.5 + 1})
    # zmuv: mean 3 and std 1 in the first run, mean 2 and std 1 in the second -> a +1 - 1, b -1 + 1
    assert weighted_sum(runs, [1.0, 1.0], norm="zmuv")["q"] == pytest.approx({"a": 0.0, "b": 0.0})
    # sum: shift by the minimum, divide by the shifted total -> a (4-2)/2 + 0/2, b 0/2 + (3-1)/2
    assert weighted_sum(runs, [1.0, 1.0], norm="sum")["q"] == pytest.approx({"a": 1.0, "b": 1.0})
    # All scores equal: 0/0, normalised to 0 as ranx does (min-max here).
    assert weighted_sum([{"q": {"a": 5.0}}, {"q": {"a": 5.0, "b": 5.0}}], [1.0, 1.0])["q"] == {"a": 0.0, "b": 0.0}


@pytest.mark.parametrize("norm", ["min-max", "sum", "zmuv"])
def test_all_equal_scores_leave_the_order_to_the_other_run(norm):
    # The first run cannot tell its documents apart (one document): a -> 0, and b, missing, gets its minimum, 0.
    # Second run {a 1, b 3}: min-max a 0, b 1; sum (shifted 0 and 2, total 2) a 0, b 1; zmuv (mean 2, std 1) a -1, b 1.
    expected = {"zmuv": {"a": -1.0, "b": 1.0}}.get(norm, {"a": 0.0, "b": 1.0})
    fused = weighted_sum([{"q": {"a": 5.0}}, {"q": {"a": 1.0, "b": 3.0}}], [1.0, 1.0], norm=norm)
    assert fused["q"] == pytest.approx(expected)


def test_min_max_has_no_floor_on_a_tiny_range():
    # Range 1e-12: a (1e-12 - 0) / 1e-12 = 1, b 0. ranx's 1e-9 floor on the denominator would give a 0.001.
    fused = weighted_sum([{"q": {"a": 1e-12, "b": 0.0}}, {"q": {"a": 1.0, "b": 1.0}}], [1.0, 1.0])
    assert fused["q"] == pytest.approx({"a": 1.0, "b": 0.0})


# NEGATIVE ranks like SPECTER2, by -l2 distance: every retrieved document scores below 0.
NEGATIVE = {"q": {"a": -1.0, "b": -4.0}}
POSITIVE = {"q": {"a": 2.0, "c": 3.0}}


def test_missing_document_gets_the_runs_minimum_raw_scores():
    fused = weighted_sum([NEGATIVE, POSITIVE], [1.0, 1.0], norm="none")
    assert fused["q"] == pytest.approx({
        "a": -1.0 + 2.0,  #  1.0
        "b": -4.0 + 2.0,  # -2.0, missing from POSITIVE: its minimum, 2
        "c": -4.0 + 3.0,  # -1.0, missing from NEGATIVE: its minimum, -4
    })
    # With a missing document counted 0, c would score 0 + 3 = 3 and outrank a, which both runs retrieved and
    # NEGATIVE ranked first.
    assert list(fused["q"]) == ["a", "c", "b"]


def test_missing_document_gets_the_runs_minimum_zmuv():
    fused = weighted_sum([NEGATIVE, POSITIVE], [1.0, 1.0], norm="zmuv")
    # NEGATIVE: mean -2.5, std 1.5 -> a +1, b -1.   POSITIVE: mean 2.5, std 0.5 -> a -1, c +1.
    assert fused["q"] == pytest.approx({
        "a": 1.0 - 1.0,   #  0
        "b": -1.0 - 1.0,  # -2, missing from POSITIVE: its minimum normalised score, -1 (counting 0 would give -1)
        "c": -1.0 + 1.0,  #  0, missing from NEGATIVE: its minimum normalised score, -1 (counting 0 would give 1)
    })


def test_missing_document_gets_the_runs_minimum_normalised_score_not_raw():
    # max: first run a 2/4 = 0.5, c 4/4 = 1;  second run a 10/20 = 0.5, b 20/20 = 1.
    fused = weighted_sum([{"q": {"a": 2.0, "c": 4.0}}, {"q": {"a": 10.0, "b": 20.0}}], [1.0, 1.0], norm="max")
    assert fused["q"] == pytest.approx({
        "a": 0.5 + 0.5,  # 1.0
        "b": 0.5 + 1.0,  # 1.5: the first run's minimum normalised score 0.5 (its raw minimum 2 would give 3)
        "c": 1.0 + 0.5,  # 1.5
    })


def test_run_without_documents_for_a_query_contributes_nothing():
    # The empty run has no minimum to give: min-max of the other run alone, a 1, b 0.
    assert weighted_sum([{"q": {}}, {"q": {"a": 2.0, "b": 1.0}}], [1.0, 1.0])["q"] == {"a": 1.0, "b": 0.0}
    assert weighted_sum([{"q": {}}, {"p": {"a": 1.0}}], [1.0, 1.0]) == {"p": {"a": 0.0}, "q": {}}


def test_rrf_takes_negative_scores_as_ranks():
    # NEGATIVE ranks a 1, b 2; POSITIVE ranks c 1, a 2. k=0: a 1/1 + 1/2, b 1/2, c 1/1.
    assert rrf([NEGATIVE, POSITIVE], k=0)["q"] == pytest.approx({"a": 1.5, "b": 0.5, "c": 1.0})


@pytest.mark.parametrize("norm, run, message", [
    ("max", {"q3": {"a": -1.0, "b": -2.0}}, "its scores are <= 0 (use min-max or zmuv)"),
    ("max", {"q3": {"a": 0.0, "b": 0.0}}, "its scores are <= 0 (use min-max or zmuv)"),
    ("max", {"q3": {"a": 1.0, "b": -0.5}}, "it has negative scores, down to -0.5 (use min-max or zmuv)"),
    ("min-max", {"q3": {"a": 1.0, "b": math.nan}}, "document 'b' scores nan"),
    ("zmuv", {"q3": {"a": -math.inf, "b": 1.0}}, "document 'a' scores -inf"),
    ("sum", {"q3": {"a": math.inf}}, "document 'a' scores inf"),
    ("none", {"q3": {"a": math.nan}}, "document 'a' scores nan"),
])
def test_undefined_normalisations_name_the_norm_run_and_query(norm, run, message):
    expected = f"norm {norm!r} is undefined for run 2 query 'q3': {message}"
    with pytest.raises(UndefinedFusion, match=re.escape(expected)):
        weighted_sum([{"q3": {"a": 1.0}}, run], [1.0, 1.0], norm=norm)
    with pytest.raises(ValueError, match=re.escape(
            f"fusion 'hybrid': norm {norm!r} is undefined for run 2 ('baseline') query 'q3': {message}")):
        spec = {"name": "hybrid", "runs": ["bm25", "baseline"], "method": "wsum", "weights": [1, 1], "norm": norm}
        fuse_systems({"bm25": {"q3": {"a": 1.0}}, "baseline": run}, [spec])


def test_rrf_rejects_nan():
    expected = "rrf is undefined for run 1 query 'q': document 'b' scores nan, which has no rank"
    with pytest.raises(UndefinedFusion, match=re.escape(expected)):
        rrf([{"q": {"a": 1.0, "b": math.nan}}, POSITIVE])


def test_fuse_dispatches():
    assert fuse([SPARSE, DENSE]) == rrf([SPARSE, DENSE])
    assert fuse([SPARSE, DENSE], method="rrf", k=10) == rrf([SPARSE, DENSE], k=10)
    expected = weighted_sum([SPARSE, DENSE], [0.5, 0.5], norm="max")
    assert fuse([SPARSE, DENSE], method="wsum", weights=[0.5, 0.5], norm="max") == expected
    assert fuse([SPARSE, DENSE], method="weighted_sum", weights=[0.5, 0.5], norm="max") == expected


@pytest.mark.parametrize("call, message", [
    (lambda: fuse([SPARSE, DENSE], method="borda"), "unknown fusion method 'borda'"),
    (lambda: fuse([SPARSE, DENSE], method="wsum"), "needs weights"),
    (lambda: fuse([SPARSE, DENSE], method="wsum", weights=[1.0]), "one weight per run: got 1 weights for 2 runs"),
    (lambda: fuse([SPARSE, DENSE], method="wsum", weights=[1.0, math.nan]), "finite numbers as weights"),
    (lambda: fuse([SPARSE, DENSE], method="rrf", weights=[1.0, 1.0]), "unknown: weights"),
    (lambda: fuse([SPARSE, DENSE], method="wsum", weights=[1.0, 1.0], norm="rank"), "unknown normalisation 'rank'"),
    (lambda: fuse([SPARSE]), "at least two runs, got 1"),
    (lambda: rrf([SPARSE, DENSE], k=-1), "k >= 0"),
])
def test_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_agrees_with_ranx_without_ties():
    """Where ranx is well defined (same queries in every run, no tied scores) it gives the same fused scores."""
    import ranx
    rng = random.Random(0)
    runs = [{f"q{q}": {f"d{d}": rng.random() for d in rng.sample(range(30), 12)} for q in range(5)} for _ in range(3)]
    for method, params, ours in [
        ("rrf", {"k": 60}, rrf(runs, k=60)),
        ("wsum", {"weights": [0.2, 0.5, 0.3]}, weighted_sum(runs, [0.2, 0.5, 0.3], norm="min-max")),
    ]:
        norm = None if method == "rrf" else "min-max"
        theirs = ranx.fuse([ranx.Run(run) for run in runs], norm=norm, method=method, params=params).to_dict()
        assert ours.keys() == theirs.keys()
        for qid in ours:
            assert ours[qid] == pytest.approx(dict(theirs[qid]), abs=1e-12), (method, qid)


@pytest.mark.parametrize("norm", ["max", "sum", "zmuv", "none"])
def test_weighted_sum_agrees_with_ranx_when_every_run_retrieves_the_same_documents(norm):
    """ranx gives a missing document 0 where we give the run's minimum; with no document missing (and positive
    scores for max) that difference does not arise, so every normalisation must agree."""
    import ranx
    rng = random.Random(1)
    docs = {f"q{q}": rng.sample(range(30), 12) for q in range(5)}
    runs = [{qid: {f"d{d}": rng.random() + 0.01 for d in ds} for qid, ds in docs.items()} for _ in range(2)]
    ours = weighted_sum(runs, [0.4, 0.6], norm=norm)
    theirs = ranx.fuse([ranx.Run(run) for run in runs], norm=None if norm == "none" else norm, method="wsum",
                       params={"weights": [0.4, 0.6]}).to_dict()
    assert ours.keys() == theirs.keys()
    for qid in ours:
        assert ours[qid] == pytest.approx(dict(theirs[qid]), abs=1e-12), (norm, qid)


def test_fuse_systems_names_fused_runs_and_skips_absent_members():
    runs = {"bm25": SPARSE, "finetuned": DENSE}
    specs = [{"name": "hybrid", "runs": ["bm25", "finetuned"], "method": "rrf", "k": 60},
             {"name": "with_baseline", "runs": ["bm25", "baseline"]},            # no baseline run: skipped
             {"name": "again", "runs": ["hybrid", "bm25"], "method": "wsum", "weights": [1.0, 0.0]}]
    fused = fuse_systems(runs, specs)
    assert list(fused) == ["hybrid", "again"]
    assert fused["hybrid"] == rrf([SPARSE, DENSE], k=60)
    # Weight 0 on bm25: the min-max normalised hybrid scores alone, so the order is the hybrid's.
    assert list(fused["again"]["q1"]) == list(fused["hybrid"]["q1"])
    assert specs[0] == {"name": "hybrid", "runs": ["bm25", "finetuned"], "method": "rrf", "k": 60}  # not consumed


@pytest.mark.parametrize("spec, message", [
    ({"runs": ["bm25", "finetuned"]}, "needs a name"),
    ({"name": "h", "runs": ["bm25"]}, "two or more runs"),
    ({"name": "bm25", "runs": ["bm25", "finetuned"]}, "already a system"),
    ({"name": "h", "runs": ["bm25", "finetuned"], "method": "rrf", "kk": 1}, "fusion 'h': .* unknown: kk"),
])
def test_fuse_systems_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        fuse_systems({"bm25": SPARSE, "finetuned": DENSE}, [spec])
