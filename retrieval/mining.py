"""Hard-negative mining: BM25 hits for each query that are not judged relevant, within a rank window."""

from __future__ import annotations

import random
from typing import Mapping

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
