"""Ranking metrics with trec_eval's definitions, as small pure functions (in the style of ranx).

A run is ``{query_id: {doc_id: score}}``; qrels are ``{query_id: {doc_id: grade}}``. As trec_eval does,
documents are ranked by score (descending) with ties broken by doc id (descending), only queries in the qrels
are scored, a query missing from the run scores 0, and a document is relevant when its grade is > 0.
nDCG uses the grades as linear gains with a log2(rank + 1) discount.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]


def ranked(doc_scores: Mapping[str, float]) -> list[str]:
    """Doc ids in trec_eval order: score descending, then doc id descending."""
    return [d for d, _ in sorted(doc_scores.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def ndcg_at(ranking: list[str], grades: Mapping[str, int], k: int) -> float:
    dcg = sum(grades.get(doc, 0) / math.log2(rank + 2) for rank, doc in enumerate(ranking[:k]) if grades.get(doc, 0) > 0)
    ideal = sorted((g for g in grades.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(rank + 2) for rank, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at(ranking: list[str], grades: Mapping[str, int], k: int) -> float:
    relevant = sum(1 for g in grades.values() if g > 0)
    if relevant == 0:
        return 0.0
    return sum(1 for doc in ranking[:k] if grades.get(doc, 0) > 0) / relevant


def mrr_at(ranking: list[str], grades: Mapping[str, int], k: int) -> float:
    for rank, doc in enumerate(ranking[:k]):
        if grades.get(doc, 0) > 0:
            return 1.0 / (rank + 1)
    return 0.0


def map_at(ranking: list[str], grades: Mapping[str, int], k: int) -> float:
    relevant = sum(1 for g in grades.values() if g > 0)
    if relevant == 0:
        return 0.0
    hits, precision_sum = 0, 0.0
    for rank, doc in enumerate(ranking[:k]):
        if grades.get(doc, 0) > 0:
            hits += 1
            precision_sum += hits / (rank + 1)
    return precision_sum / relevant


METRIC_FUNCTIONS: dict[str, Callable[[list[str], Mapping[str, int], int], float]] = {
    "ndcg": ndcg_at,
    "recall": recall_at,
    "mrr": mrr_at,
    "map": map_at,
}

# Reported by the evaluate stage. Keys have no dots so that `dvc metrics diff` and `dvc exp show` read well.
DEFAULT_METRICS = ["ndcg_at_10", "recall_at_5", "recall_at_20", "recall_at_100", "mrr_at_10", "map_at_100"]


def parse_metric(name: str) -> tuple[Callable, int]:
    """``"ndcg_at_10"`` -> (ndcg_at, 10)."""
    family, sep, cutoff = name.partition("_at_")
    if not sep or family not in METRIC_FUNCTIONS or not (cutoff.isascii() and cutoff.isdigit()) or int(cutoff) < 1:
        raise ValueError(f"unknown metric {name!r}: use <{'|'.join(METRIC_FUNCTIONS)}>_at_<k>, e.g. ndcg_at_10")
    return METRIC_FUNCTIONS[family], int(cutoff)


def per_query(qrels: Qrels, run: Run, metric: str) -> dict[str, float]:
    """Score of every query in the qrels (sorted by query id) for one metric."""
    function, k = parse_metric(metric)
    return {qid: function(ranked(run.get(qid, {})), qrels[qid], k) for qid in sorted(qrels)}


def evaluate(qrels: Qrels, run: Run, metrics: list[str] = DEFAULT_METRICS) -> dict[str, float]:
    """Mean of each metric over the queries in the qrels."""
    if not qrels:
        raise ValueError("no queries with relevance judgements to evaluate")
    return {m: sum(scores.values()) / len(scores) for m in metrics for scores in [per_query(qrels, run, m)]}
