"""Validation as retrieval: the validation queries search the validation corpus (the whole corpus, or a seeded
sample of it) with the model as it is now, scored with this project's own trec_eval metrics, the same way for
every family. This is the selection signal: the train stage keeps the best of the base model and every epoch.

Each family supplies only ``search(model) -> run`` (how its in-memory model encodes and searches, see
:func:`dense_search`); :class:`RetrievalValidator` does the rest and plugs into the sentence-transformers trainers as
an evaluator (it is a ``SentenceEvaluator``)."""

from __future__ import annotations

import random
from typing import Callable, Mapping

import numpy as np
from sentence_transformers.base.evaluation.evaluator import SentenceEvaluator

from ..metrics import per_query
from ..precision import inference_precision

Run = dict[str, dict[str, float]]
VALIDATION_METRICS = ("ndcg_at_10", "recall_at_100", "mrr_at_10")
DEPTH = 100


class RetrievalValidator(SentenceEvaluator):
    """``validator(model)`` -> ``{"val_ndcg_at_10": ..., "val_recall_at_100": ..., "val_mrr_at_10": ...}``: means
    over the validation queries of ``search(model)``'s run against ``qrels``. Encoding runs in inference mode and
    in ``precision`` (the index stages' own), with the model switched to eval mode and back."""

    def __init__(self, search: Callable[[object], Run], qrels: Mapping[str, Mapping[str, int]], *, name: str = "val",
                 precision: str = "fp32", base_run: Run | None = None, task: Mapping | None = None) -> None:
        super().__init__()
        if not qrels:
            raise ValueError("validation needs at least one query with relevance judgements")
        self.search, self.qrels, self.name, self.precision = search, dict(qrels), name, precision
        self.base_run = base_run
        # What is validated on (queries, documents), for the checkpoint fingerprint: scores recorded against other
        # validation data must not carry over into a resumed run.
        self.task = {"qrels": self.qrels, "precision": precision, **dict(task or {})}
        self.primary_metric = f"{name}_ndcg_at_10"

    def score_base(self, model) -> float:
        """The base model's primary score: from ``base_run`` when the caller has it already (the baseline index
        searched with the validation queries is the same search, done once), else by running the model."""
        if self.base_run is not None:
            return self.scores(self.base_run)[self.primary_metric]
        return self(model)[self.primary_metric]

    def run(self, model) -> Run:
        import torch

        module = getattr(model, "model", model)  # SPECTER2's encoder wraps the torch module
        training = getattr(module, "training", False)
        if hasattr(module, "eval"):
            module.eval()
        try:
            with torch.inference_mode(), inference_precision(self.precision):
                return self.search(model)
        finally:
            if training:
                module.train()

    def __call__(self, model, output_path=None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
        return self.scores(self.run(model))

    def scores(self, run: Run) -> dict[str, float]:
        scores = {}
        for metric in VALIDATION_METRICS:
            values = per_query(self.qrels, run, metric)
            scores[f"{self.name}_{metric}"] = float(sum(values.values()) / len(values))
        return scores


def corpus_size_setting(size) -> str | int:
    """``train.validation_corpus``: "all" or a positive number of documents."""
    if str(size).strip().lower() == "all":
        return "all"
    try:
        number = int(size)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise ValueError(f"validation_corpus: expected 'all' or a number of documents, got {size!r}")
    return number


def validation_corpus(corpus: Mapping[str, dict], required: set[str], size, *, seed: int = 42) -> dict[str, dict]:
    """The documents validation searches: ``size`` "all" -> the whole corpus; a number N -> the ``required`` ones
    (validation positives and their BM25 candidates) plus a seeded random sample of the rest, N in all (see
    :func:`check_sample_size` for how small N may be)."""
    target = corpus_size_setting(size)
    if target == "all":
        return dict(corpus)
    missing = sorted(required - set(corpus))
    if missing:
        raise ValueError(f"validation documents not in the corpus: {', '.join(missing[:5])}")
    if target >= len(corpus):
        return dict(corpus)
    rest = sorted(set(corpus) - required)
    sampled = set(random.Random(seed).sample(rest, max(0, target - len(required))))
    return {doc_id: corpus[doc_id] for doc_id in corpus if doc_id in required or doc_id in sampled}


def check_sample_size(size, positives: int) -> None:
    """A sample must hold at least 10x the validation positives, or finding them is too easy to select on."""
    target = corpus_size_setting(size)
    if target != "all" and target < 10 * positives:
        raise ValueError(f"validation_corpus {size}: a sample must hold at least 10x the {positives} validation "
                         f"positives ({10 * positives}); use a larger number or 'all'")


def top_k_run(scores: np.ndarray, doc_ids: list[str], qids: list[str], k: int = DEPTH) -> Run:
    """Rows of a [queries, documents] score matrix -> each query's k best documents."""
    k = min(k, len(doc_ids))
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return {qid: {doc_ids[j]: float(scores[i, j]) for j in top[i]} for i, qid in enumerate(qids)}


def dense_search(encode_queries: Callable[[object, list[str]], np.ndarray],
                 encode_documents: Callable[[object, list], np.ndarray], queries: Mapping[str, str],
                 documents: Mapping[str, object], *, similarity: str = "dot", k: int = DEPTH,
                 prepare: Callable[[object], object] | None = None):
    """``search(model)`` for a vector family: exact scores of every query against every validation document.
    ``similarity`` is dot (vectors as encoded, e.g. already normalised for cosine), cosine, or l2 (``-||q - d||``).
    ``prepare(model)``, when given, turns the model in training into the encoder both encode functions receive
    (e.g. its export, so that validation encodes exactly as the index stage will)."""
    qids, doc_ids = list(queries), list(documents)

    def search(model) -> Run:
        encoder = prepare(model) if prepare is not None else model
        q = np.asarray(encode_queries(encoder, [queries[qid] for qid in qids]), dtype=np.float32)
        d = np.asarray(encode_documents(encoder, [documents[doc] for doc in doc_ids]), dtype=np.float32)
        if similarity == "cosine":
            q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
            d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
        if similarity == "l2":
            squared = (q ** 2).sum(1)[:, None] + (d ** 2).sum(1)[None, :] - 2 * q @ d.T
            scores = -np.sqrt(np.maximum(squared, 0.0))
        else:
            scores = q @ d.T
        return top_k_run(scores, doc_ids, qids, k)

    return search


def vector_validator(data, encode_queries: Callable[[object, list[str]], np.ndarray],
                     encode_documents: Callable[[object, list], np.ndarray], *, similarity: str = "dot",
                     prepare: Callable[[object], object] | None = None) -> RetrievalValidator:
    """The validator of a vector family, from ``TrainingData``'s validation queries, corpus and qrels."""
    return RetrievalValidator(dense_search(encode_queries, encode_documents, data.val_queries, data.val_corpus,
                                           similarity=similarity, prepare=prepare), data.val_qrels,
                              precision=data.precision, base_run=data.base_run, task=validation_task(data))


def validation_task(data) -> dict:
    """The validation queries and document ids of ``TrainingData`` and the encoding backend (see
    ``RetrievalValidator.task``)."""
    encoding = getattr(data, "encoding", None)
    return {"queries": dict(data.val_queries), "documents": sorted(data.val_corpus),
            **({"encoding": encoding.describe()} if encoding is not None and encoding.exported else {})}
