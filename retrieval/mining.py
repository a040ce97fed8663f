"""Hard-negative mining: documents near each query (BM25 hits or dense neighbours) that are not judged relevant."""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from itertools import zip_longest
from typing import Mapping

import numpy as np

from .bm25 import Hits


def mine_negatives(results: Mapping[str, Hits], qrels: Mapping[str, Mapping[str, int]], queries: Mapping[str, str], *,
                   rank_start: int = 1, rank_end: int = 30, count: int = 5, sample: bool = False,
                   seed: int = 42) -> list[dict]:
    """One record per query with its positives and up to ``count`` negatives from ranks [rank_start, rank_end].

    Ranks are 1-based BM25 ranks. Any judged document, relevant or not, is excluded: grade-0 judgements are
    known non-relevant, but in BEIR collections they are rare and usually mark near-misses. With ``sample`` the
    negatives are drawn at random from the window (seeded) instead of taken from its top.
    """
    if not 1 <= rank_start <= rank_end:
        raise ValueError(f"mine: need 1 <= rank_start <= rank_end, got {rank_start}..{rank_end}")
    rng = random.Random(seed)
    records = []
    for qid in sorted(qrels):
        judged = qrels[qid]
        window = [
            {"doc_id": doc, "rank": rank, "score": score}
            for rank, (doc, score) in enumerate(results.get(qid, []), start=1)
            if rank_start <= rank <= rank_end and doc not in judged
        ]
        negatives = sorted(rng.sample(window, min(count, len(window))), key=lambda n: n["rank"]) if sample else window[:count]
        records.append({
            "query_id": qid,
            "query": queries[qid],
            "positives": [{"doc_id": d, "grade": g} for d, g in sorted(judged.items()) if g > 0],
            "negatives": negatives,
        })
    return records


METHODS = ("bm25", "dense", "both")


@dataclass(frozen=True)
class DenseFilters:
    """Candidate filters of dense mining, with the meaning of sentence-transformers' ``mine_hard_negatives``.

    Candidates are each query's ``range_max`` nearest documents (plus room for its judged ones), judged documents
    removed. A margin compares with the query's *lowest* scoring positive (the harder one, as sentence-transformers
    does): ``absolute_margin`` drops candidates scoring above ``positive - margin``, ``relative_margin`` those above
    ``positive - |positive| * margin`` (0.05 is NV-Retriever's TopK-PercPos 95%), ``max_score`` those above it; then
    the first ``range_min`` survivors are skipped. Filters drop likely false negatives: unjudged relevant documents.
    """

    range_min: int = 0
    range_max: int = 30
    max_score: float | None = None
    absolute_margin: float | None = None
    relative_margin: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.range_min < self.range_max:
            raise ValueError(f"mine.dense: need 0 <= range_min < range_max, got {self.range_min}..{self.range_max}")
        for name in ("absolute_margin", "relative_margin"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"mine.dense.{name} must be >= 0 or null, got {value}")

    @classmethod
    def from_params(cls, settings: Mapping | None) -> "DenseFilters":
        """From params ``mine.dense``; an unknown key is an error naming it."""
        settings = dict(settings or {})
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(settings) - known):
            raise ValueError(f"unknown {', '.join(f'mine.dense.{k}' for k in unknown)}; the settings are "
                             f"{', '.join(sorted(known))}")
        typed = {}
        for name, value in settings.items():
            if name.startswith("range_"):
                typed[name] = int(value)
            else:
                typed[name] = None if value is None else float(value)
        return cls(**typed)


def dense_negatives(query_vectors: np.ndarray, query_ids: list[str], doc_vectors: np.ndarray, doc_ids: list[str],
                    qrels: Mapping[str, Mapping[str, int]], queries: Mapping[str, str], *, filters: DenseFilters,
                    count: int, sample: bool = False, seed: int = 42) -> tuple[list[dict], dict]:
    """Records as :func:`mine_negatives` writes them, negatives from inner-product nearest neighbours.

    ``query_vectors`` (one row per ``query_ids``) and ``doc_vectors`` (per ``doc_ids``) are scored by inner product
    (cosine for normalised vectors). ``rank`` is the 1-based rank in the query's full dense ranking. Returns the
    records and how many candidates each filter removed.
    """
    if len(query_vectors) != len(query_ids) or len(doc_vectors) != len(doc_ids):
        raise ValueError("dense_negatives: one vector per query id and per document id is needed")
    position = {doc: i for i, doc in enumerate(doc_ids)}
    most_judged = max((len(qrels.get(q, {})) for q in query_ids), default=0)
    depth = min(filters.range_max + most_judged, len(doc_ids))
    scores = np.asarray(query_vectors, dtype=np.float32) @ np.asarray(doc_vectors, dtype=np.float32).T
    rng = random.Random(seed)
    removed = {"judged": 0, "absolute_margin": 0, "relative_margin": 0, "max_score": 0, "range_min": 0}
    records, short = [], 0
    for row, qid in enumerate(query_ids):
        judged = qrels.get(qid, {})
        positives = [d for d, g in judged.items() if g > 0 and d in position]
        # stable sort: equal scores keep corpus order, so the result does not depend on argpartition's choice
        top = np.argsort(-scores[row], kind="stable")[:depth]
        window = []
        lowest_positive = min((scores[row, position[d]] for d in positives), default=None)
        for rank, index in enumerate(top, start=1):
            doc, score = doc_ids[index], float(scores[row, index])
            reason = _filtered(doc, score, judged, lowest_positive, filters)
            if reason:
                removed[reason] += 1
            else:
                window.append({"doc_id": doc, "rank": rank, "score": score})
        window = window[:filters.range_max]
        removed["range_min"] += min(filters.range_min, len(window))
        window = window[filters.range_min:]
        negatives = sorted(rng.sample(window, min(count, len(window))), key=lambda n: n["rank"]) if sample \
            else window[:count]
        short += len(negatives) < count
        records.append({
            "query_id": qid,
            "query": queries[qid],
            "positives": [{"doc_id": d, "grade": g} for d, g in sorted(judged.items()) if g > 0],
            "negatives": negatives,
        })
    return records, {"candidates": len(query_ids) * depth, "removed": removed, "queries_short": short}


def _filtered(doc: str, score: float, judged: Mapping[str, int], lowest_positive: float | None,
              filters: DenseFilters) -> str | None:
    """The first filter that removes the candidate (in sentence-transformers' order), or None."""
    if doc in judged:
        return "judged"
    if lowest_positive is not None:
        if filters.absolute_margin is not None and score + filters.absolute_margin > lowest_positive:
            return "absolute_margin"
        if filters.relative_margin is not None and \
                score > lowest_positive - abs(lowest_positive) * filters.relative_margin:
            return "relative_margin"
    if filters.max_score is not None and score > filters.max_score:
        return "max_score"
    return None


def interleave_negatives(first: list[dict], second: list[dict], count: int, *,
                         sources: tuple[str, str] = ("dense", "bm25")) -> list[dict]:
    """``mine.method: both``: one record per query whose negatives alternate first, second, first, ... (each
    marked with its ``source``, ``rank`` and ``score`` being that source's), duplicates dropped, at most ``count``."""
    second_by_query = {r["query_id"]: r for r in second}
    merged = []
    for record in first:
        other = second_by_query[record["query_id"]]["negatives"]
        seen, negatives = set(), []
        for pair in zip_longest(record["negatives"], other):
            for source, negative in zip(sources, pair):
                if negative is not None and negative["doc_id"] not in seen and len(negatives) < count:
                    seen.add(negative["doc_id"])
                    negatives.append({**negative, "source": source})
        merged.append({**record, "negatives": negatives})
    return merged
