"""Hybrid fusion of runs: RRF and weighted sums, hand-computed, and agreeing with ranx where ranx is well defined."""

import random

import pytest

from retrieval.fusion import fuse, fuse_systems, rrf, weighted_sum
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
        "d3": 0.3 * 0.0,              # 0.00, missing from DENSE counts 0
        "d4": 0.7 * 0.0,              # 0.00
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
    # All scores equal: ranx's 1e-9 floor on the denominator makes them all 0 rather than dividing by zero.
    assert weighted_sum([{"q": {"a": 5.0}}, {"q": {"a": 5.0, "b": 5.0}}], [1.0, 1.0])["q"] == {"a": 0.0, "b": 0.0}


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
    ranx = pytest.importorskip("ranx")
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
    ({"name": "h", "runs": ["bm25", "finetuned"], "method": "rrf", "kk": 1}, "unknown: kk"),
])
def test_fuse_systems_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        fuse_systems({"bm25": SPARSE, "finetuned": DENSE}, [spec])
