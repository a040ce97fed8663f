"""Learned-sparse (SPLADE-style) retrieval on a Lucene impact index, plus an exact in-memory cross-check.

Weights are quantised to integers (``round(w * scale)``) as Anserini expects. A document is indexed as its terms
repeated ``weight`` times (Anserini's ``JsonVectorCollection``, whitespace-tokenised because of ``-pretokenized``)
and scored with ``ImpactSimilarity`` (score = term frequency x query boost), so a hit's score is the integer dot
product of the quantised query and document vectors. ``ExactSparseSearcher`` computes that same dot product with
scipy, so both searchers return the same hits, in the same order, with the same scores.

Ties are broken by document id (byte order of the UTF-8 id), as Anserini does.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from scipy import sparse

from retrieval import jvm
from retrieval.io import atomic_dir

Hits = list[tuple[str, float]]


def quantize(weights: dict[str, float], scale: float = 100.0) -> dict[str, int]:
    """Integer impacts ``round(w * scale)``; terms whose impact is not positive are dropped."""
    quantized = {term: int(round(weight * scale)) for term, weight in weights.items()}
    return {term: impact for term, impact in quantized.items() if impact > 0}


def _check_terms(doc_id: str, vector: dict[str, int]) -> None:
    # The index splits a document's text on whitespace, while queries are built from exact terms, so a term with
    # whitespace in it would be indexed as other terms and never match. Vocabulary tokens never contain any.
    for term in vector:
        if not term or any(ch.isspace() for ch in term):
            raise ValueError(f"document {doc_id!r}: term {term!r} is empty or contains whitespace")


def build_impact_index(doc_ids: list[str], doc_weights: list[dict[str, float]], index_dir, *,
                       scale: float = 100.0, threads: int = 2) -> dict:
    """Build a Lucene impact index of the quantised document weights into ``index_dir`` (atomically).

    Documents whose weights all quantise to zero cannot be indexed (Anserini skips empty documents); they could
    never be retrieved anyway. Returns ``{"num_docs", "avg_doc_terms", "index_bytes"}``.
    """
    if len(doc_ids) != len(doc_weights):
        raise ValueError(f"{len(doc_ids)} ids but {len(doc_weights)} weight dicts")
    jvm.lucene()
    from jnius import autoclass

    num_docs = total_terms = 0
    with tempfile.TemporaryDirectory(prefix="impact-collection-") as collection, atomic_dir(index_dir) as tmp_index:
        # One file per indexing thread: Anserini parallelises over files.
        num_files = max(1, min(threads, len(doc_ids)))
        files = [open(Path(collection) / f"docs{i:02d}.jsonl", "w", encoding="utf-8") for i in range(num_files)]
        try:
            for position, (doc_id, weights) in enumerate(zip(doc_ids, doc_weights)):
                vector = quantize(weights, scale)
                if not vector:
                    continue
                _check_terms(doc_id, vector)
                record = {"id": doc_id, "contents": "", "vector": vector}
                files[position % num_files].write(json.dumps(record, ensure_ascii=False) + "\n")
                num_docs += 1
                total_terms += len(vector)
        finally:
            for file in files:
                file.close()
        autoclass("io.anserini.index.IndexCollection").main([
            "-collection", "JsonVectorCollection", "-input", collection, "-index", str(Path(tmp_index).resolve()),
            "-generator", "DefaultLuceneDocumentGenerator", "-impact", "-pretokenized",
            "-threads", str(threads), "-quiet",
        ])
        index_bytes = sum(f.stat().st_size for f in Path(tmp_index).rglob("*") if f.is_file())
    return {"num_docs": num_docs, "avg_doc_terms": total_terms / max(num_docs, 1), "index_bytes": index_bytes}


class ImpactSearcher:
    """Search a Lucene impact index with a query's own quantised term weights (Anserini's SimpleImpactSearcher)."""

    def __init__(self, index_dir, scale: float = 100.0):
        jvm.lucene()
        from jnius import autoclass

        self._hash_map = autoclass("java.util.HashMap")
        self._integer = autoclass("java.lang.Integer")
        self._array_list = autoclass("java.util.ArrayList")
        # Used directly rather than through pyserini's LuceneImpactSearcher, which needs a query *encoder* and
        # reads every term of the index at start-up to filter query terms by idf.
        self._searcher = autoclass("io.anserini.search.SimpleImpactSearcher")(str(Path(index_dir).resolve()))
        self.scale = scale
        self.num_docs = self._searcher.get_total_num_docs()

    def _java_query(self, query_weights: dict[str, float]):
        query = self._hash_map()
        for term, impact in quantize(query_weights, self.scale).items():
            query.put(term, self._integer(impact))
        return query

    @staticmethod
    def _hits(scored_docs) -> Hits:
        # Lucene's sums of integer impacts are exact; Anserini then lowers tied scores by 1e-6 per tie to keep
        # their order, which rounding undoes.
        return [(hit.docid, float(round(hit.score))) for hit in scored_docs]

    def search(self, query_weights: dict[str, float], k: int = 10) -> Hits:
        return self._hits(self._searcher.search(self._java_query(query_weights), int(k)))

    def batch_search(self, query_weights: list[dict[str, float]], qids: list[str], k: int = 10,
                     threads: int = 2) -> dict[str, Hits]:
        if len(query_weights) != len(qids):
            raise ValueError(f"{len(query_weights)} queries but {len(qids)} ids")
        queries, ids = self._array_list(), self._array_list()
        for qid, weights in zip(qids, query_weights):
            queries.add(self._java_query(weights))
            ids.add(str(qid))
        results = self._searcher.batch_search(queries, ids, int(k), int(threads))
        return {qid: self._hits(results.get(str(qid)) or []) for qid in qids}

    def close(self) -> None:
        self._searcher.close()


class ExactSparseSearcher:
    """Exact integer dot product of quantised query and document weights, in memory (scipy.sparse)."""

    def __init__(self, doc_ids: list[str], doc_weights: list[dict[str, float]], scale: float = 100.0):
        if len(doc_ids) != len(doc_weights):
            raise ValueError(f"{len(doc_ids)} ids but {len(doc_weights)} weight dicts")
        self.doc_ids = list(doc_ids)
        self.scale = scale
        self.term_index: dict[str, int] = {}
        rows, cols, values = [], [], []
        for row, weights in enumerate(doc_weights):
            for term, impact in quantize(weights, scale).items():
                rows.append(row)
                cols.append(self.term_index.setdefault(term, len(self.term_index)))
                values.append(impact)
        self.doc_matrix = sparse.csr_matrix(
            (np.array(values, dtype=np.int64), (rows, cols)), shape=(len(doc_ids), len(self.term_index)))
        # Rank of each document in Lucene's tie-break order (UTF-8 bytes of the id).
        order = sorted(range(len(doc_ids)), key=lambda i: doc_ids[i].encode("utf-8"))
        self._id_rank = np.empty(len(doc_ids), dtype=np.int64)
        self._id_rank[order] = np.arange(len(doc_ids))

    def _query_matrix(self, query_weights: list[dict[str, float]]) -> sparse.csr_matrix:
        rows, cols, values = [], [], []
        for row, weights in enumerate(query_weights):
            for term, impact in quantize(weights, self.scale).items():
                if term in self.term_index:
                    rows.append(row)
                    cols.append(self.term_index[term])
                    values.append(impact)
        return sparse.csr_matrix((np.array(values, dtype=np.int64), (rows, cols)),
                                 shape=(len(query_weights), len(self.term_index)))

    def _top_k(self, doc_rows: np.ndarray, scores: np.ndarray, k: int) -> Hits:
        # Only documents sharing a term with the query (score > 0) are hits, as in Lucene.
        keep = scores > 0
        doc_rows, scores = doc_rows[keep], scores[keep]
        best = np.lexsort((self._id_rank[doc_rows], -scores))[:k]
        return [(self.doc_ids[doc_rows[i]], float(scores[i])) for i in best]

    def search(self, query_weights: dict[str, float], k: int = 10) -> Hits:
        return self.batch_search([query_weights], ["q"], k)["q"]

    def batch_search(self, query_weights: list[dict[str, float]], qids: list[str], k: int = 10,
                     threads: int = 2) -> dict[str, Hits]:
        """``threads`` is accepted for API compatibility with ImpactSearcher and ignored."""
        if len(query_weights) != len(qids):
            raise ValueError(f"{len(query_weights)} queries but {len(qids)} ids")
        results = {}
        chunk = 256  # queries per sparse product, to bound memory on large corpora
        for start in range(0, len(qids), chunk):
            scores = (self._query_matrix(query_weights[start:start + chunk]) @ self.doc_matrix.T).tocsr()
            for offset, qid in enumerate(qids[start:start + chunk]):
                row = scores.getrow(offset)
                results[qid] = self._top_k(row.indices, row.data, k)
        return results
