"""Teacher scores for distillation: a cross-encoder scores each training query against its positives and its mined
hard negatives; the bi-encoder then learns the teacher's score margins with Margin-MSE (Hofstaetter et al. 2020, the
loss GPL uses) instead of contrastive labels."""

from __future__ import annotations

from typing import Mapping

from .dataset import doc_text


def teacher_pairs(records: list[dict], negatives_per_query: int) -> list[tuple[str, str]]:
    """(query id, doc id) pairs the student will see: every positive and the first ``negatives_per_query`` mined
    negatives of each record (records as the mine stage writes them), without repeats."""
    if negatives_per_query < 1:
        raise ValueError(f"negatives_per_query must be >= 1, got {negatives_per_query}")
    pairs: dict[tuple[str, str], None] = {}
    for record in records:
        for doc in record["positives"] + record["negatives"][:negatives_per_query]:
            pairs[(record["query_id"], doc["doc_id"])] = None
    return list(pairs)


def score_records(score_pairs, records: list[dict], corpus: Mapping[str, dict], negatives_per_query: int) -> list[dict]:
    """``[{"query_id", "scores": {doc_id: teacher score}}]`` for the pairs of :func:`teacher_pairs`.

    ``score_pairs`` maps a list of (query text, document text) to raw scores, e.g. a bound
    ``retrieval.models.cross_encoder.score_pairs``.
    """
    queries = {record["query_id"]: record["query"] for record in records}
    pairs = teacher_pairs(records, negatives_per_query)
    if missing := sorted({doc for _, doc in pairs if doc not in corpus}):
        raise KeyError(f"{len(missing)} mined documents are not in the corpus, e.g. {missing[:5]}")
    scores = score_pairs([(queries[qid], doc_text(corpus[doc])) for qid, doc in pairs])
    if len(scores) != len(pairs):
        raise ValueError(f"the teacher returned {len(scores)} scores for {len(pairs)} pairs")
    by_query: dict[str, dict[str, float]] = {}
    for (qid, doc), score in zip(pairs, scores):
        by_query.setdefault(qid, {})[doc] = float(score)
    return [{"query_id": qid, "scores": docs} for qid, docs in by_query.items()]


def attach_teacher_scores(examples: list[dict], scores: Mapping[str, Mapping[str, float]]) -> list[dict]:
    """Add ``teacher`` = [score of the positive, scores of the negatives in order] to training examples that carry
    ``query_id``, ``positive_id`` and ``negative_ids``; a negative the teacher did not score ends the list there."""
    out = []
    for example in examples:
        query_scores = scores.get(example["query_id"], {})
        if example["positive_id"] not in query_scores:
            raise KeyError(f"no teacher score for query {example['query_id']!r} and its positive "
                           f"{example['positive_id']!r}: were the teacher scores made from the same mined negatives?")
        teacher = [query_scores[example["positive_id"]]]
        for doc_id in example["negative_ids"]:
            if doc_id not in query_scores:
                break
            teacher.append(query_scores[doc_id])
        out.append({**example, "teacher": teacher})
    return out
