"""BM25 over a real Lucene index through pyserini, with documents indexed "flat" (title + text in one field,
as pyserini's BEIR flat indexes are)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Mapping

from . import jvm
from .dataset import doc_text
from .io import atomic_dir

Hits = list[tuple[str, float]]


def build_bm25_index(corpus: Mapping[str, dict], index_dir: str | os.PathLike, *, threads: int = 2) -> dict:
    """Index ``corpus`` (doc_id -> {"title", "text"}) into a Lucene index at ``index_dir``; return its stats."""
    jvm.lucene()
    from jnius import autoclass

    index_collection = autoclass("io.anserini.index.IndexCollection")
    with tempfile.TemporaryDirectory(prefix="bm25-collection-") as collection, atomic_dir(index_dir) as tmp_index:
        with open(Path(collection) / "docs.jsonl", "w", encoding="utf-8") as out:
            for doc_id, doc in corpus.items():
                out.write(json.dumps({"id": doc_id, "contents": doc_text(doc)}, ensure_ascii=False) + "\n")
        index_collection.main([
            "-collection", "JsonCollection", "-input", collection, "-index", str(Path(tmp_index).resolve()),
            "-generator", "DefaultLuceneDocumentGenerator", "-threads", str(threads),
            "-storePositions", "-storeDocvectors", "-storeRaw", "-quiet",
        ])
    return {"num_docs": BM25Searcher(index_dir).num_docs}


class BM25Searcher:
    """pyserini's ``LuceneSearcher`` with BM25 parameters set; hits are ``(doc_id, score)`` pairs."""

    def __init__(self, index_dir: str | os.PathLike, *, k1: float = 0.9, b: float = 0.4):
        # absolute: the JVM resolves relative paths against the folder it started in, not the current one
        self._searcher = jvm.lucene().LuceneSearcher(str(Path(index_dir).resolve()))
        self._searcher.set_bm25(k1, b)

    @property
    def num_docs(self) -> int:
        return self._searcher.num_docs

    def search(self, query: str, k: int = 10) -> Hits:
        return [(hit.docid, float(hit.score)) for hit in self._searcher.search(query, k=k)]

    def batch_search(self, queries: list[str], qids: list[str], k: int = 10, threads: int = 2) -> dict[str, Hits]:
        results = self._searcher.batch_search(queries, qids, k=k, threads=threads)
        return {qid: [(hit.docid, float(hit.score)) for hit in results.get(qid, [])] for qid in qids}


def hits_to_run(results: Mapping[str, Hits]) -> dict[str, dict[str, float]]:
    return {qid: dict(hits) for qid, hits in results.items()}
