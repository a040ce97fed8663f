"""Dense vector search with faiss: exact inner product by default, HNSW or IVF-PQ for large corpora.

An index folder holds ``index.faiss``, ``docids.txt`` (row i of the index is line i) and ``index.json``
(what built it, so the searcher can check and report it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .io import atomic_dir

Hits = list[tuple[str, float]]
KINDS = ("flat", "hnsw", "ivfpq")


def build_faiss_index(embeddings: np.ndarray, kind: str = "flat", *, hnsw_m: int = 32, hnsw_ef_construction: int = 200,
                      ivf_nlist: int = 1024, pq_m: int = 16, seed: int = 42):
    import faiss

    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = hnsw_ef_construction
    elif kind == "ivfpq":
        if dim % pq_m:
            raise ValueError(f"ivfpq: pq_m={pq_m} must divide the embedding dimension {dim}")
        # faiss wants ~39 training points per centroid; clamp nlist so small corpora still train.
        nlist = max(1, min(ivf_nlist, n // 39))
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(vectors)
    else:
        raise ValueError(f"unknown faiss index kind {kind!r}: use one of {', '.join(KINDS)}")
    index.add(vectors)
    return index


def save_dense_index(index, doc_ids: list[str], index_dir: str | os.PathLike, info: dict) -> None:
    import faiss

    if index.ntotal != len(doc_ids):
        raise ValueError(f"index has {index.ntotal} vectors but {len(doc_ids)} doc ids")
    with atomic_dir(index_dir) as tmp:
        faiss.write_index(index, str(tmp / "index.faiss"))
        (tmp / "docids.txt").write_text("".join(f"{d}\n" for d in doc_ids), encoding="utf-8")
        (tmp / "index.json").write_text(json.dumps({**info, "num_docs": len(doc_ids)}, indent=2) + "\n", encoding="utf-8")


def read_index_info(index_dir: str | os.PathLike) -> dict:
    return json.loads((Path(index_dir) / "index.json").read_text(encoding="utf-8"))


class FaissSearcher:
    """Searches a saved faiss index with query vectors; hits are ``(doc_id, score)`` pairs."""

    def __init__(self, index_dir: str | os.PathLike, *, hnsw_ef_search: int = 128, ivf_nprobe: int = 32):
        import faiss

        self.index = faiss.read_index(str(Path(index_dir) / "index.faiss"))
        self.doc_ids = (Path(index_dir) / "docids.txt").read_text(encoding="utf-8").splitlines()
        self.info = read_index_info(index_dir)
        if hasattr(self.index, "hnsw"):
            self.index.hnsw.efSearch = hnsw_ef_search
        if hasattr(self.index, "nprobe"):
            self.index.nprobe = ivf_nprobe

    def search(self, query_vector: np.ndarray, k: int = 10) -> Hits:
        return next(iter(self.batch_search(query_vector[None, :], ["q"], k).values()))

    def batch_search(self, query_vectors: np.ndarray, qids: list[str], k: int = 10) -> dict[str, Hits]:
        scores, rows = self.index.search(np.ascontiguousarray(query_vectors, dtype=np.float32), min(k, len(self.doc_ids)))
        return {
            qid: [(self.doc_ids[r], float(s)) for s, r in zip(score_row, row) if r >= 0]
            for qid, score_row, row in zip(qids, scores, rows)
        }
