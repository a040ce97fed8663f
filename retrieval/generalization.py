"""Evaluate a sentence-transformers model with mteb 2.x on a local BEIR collection, offline.

mteb is the reference implementation of these numbers, so scoring a model with it is a cross-check of our own
encode -> search -> ``retrieval.metrics`` pipeline, and gives result files in mteb's format.

- :func:`local_retrieval_task` builds an mteb retrieval task from a :class:`retrieval.dataset.Dataset` held in
  memory (no Hugging Face hub: the task sets its data itself, as mteb's mock tasks do).
- :func:`evaluate_model` runs ``mteb.evaluate`` on such tasks and returns their main scores under our metric names;
  given an :class:`~retrieval.models.base.Embedder`, mteb encodes through it (our pipeline's encoders, batches and
  embedding cache) and does the rest (similarity, top-k, pytrec_eval) itself.
- :func:`score_collection` scores several systems on one collection both ways, ours (exact search over the same
  vectors, ``retrieval.metrics``) and mteb's, and :func:`compare_systems_on` turns that into baseline vs
  fine-tuned with a paired randomisation test: the generalize stage's table, one row per collection.
- :class:`GeneralizeSettings` and :class:`Collection` are the typed params (``generalize``).

What mteb computes, checked against its source (mteb 2.26): documents are read as ``(title + " " + text).strip()``
(our ``doc_text``), queries as their text; queries are encoded with ``encode_query`` and documents with
``encode_document`` (so a Router model, e.g. our DPR family, routes each through its own tower, and a model's
"query"/"document" prompts are applied); scores are ``model.similarity`` (cosine or dot, as the model says), the top
1000 documents per query are kept, and pytrec_eval ranks ties by doc id descending as ``retrieval.metrics`` does.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Mapping

import numpy as np

from .dataset import Dataset

# Our metric name -> the key of mteb's score dict (mteb 2.x already spells them as we do).
MTEB_SCORES = {
    "ndcg_at_10": "ndcg_at_10",
    "recall_at_10": "recall_at_10",
    "recall_at_100": "recall_at_100",
    "map_at_100": "map_at_100",
    "mrr_at_10": "mrr_at_10",
}
# A task name is also the file name of its result (``<task>.json``): keep it to safe characters.
_TASK_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")


@cache
def _retrieval_task_class():
    """The base class, defined on first use so that importing this module does not import mteb (seconds)."""
    from mteb.abstasks import AbsTaskRetrieval

    class LocalRetrieval(AbsTaskRetrieval):
        """A retrieval task whose corpus, queries and qrels are given in memory (``self._source``)."""

        def load_data(self, num_proc=None, **kwargs) -> None:
            # mteb unloads a task's data after evaluating it; this rebuilds it from the source kept on the instance.
            if self.data_loaded:
                return
            from datasets import Dataset as HFDataset

            corpus, queries, qrels = self._source
            self.dataset = {"default": {self.metadata.eval_splits[0]: {
                "corpus": HFDataset.from_dict(corpus),
                "queries": HFDataset.from_dict(queries),
                "relevant_docs": {qid: dict(docs) for qid, docs in qrels.items()},
                "top_ranked": None,
            }}}
            self.data_loaded = True

    return LocalRetrieval


def local_retrieval_task(dataset: Dataset, *, split: str, name: str, qrels: Mapping[str, Mapping[str, int]] | None = None,
                         folder: str | os.PathLike | None = None, language: str = "eng-Latn"):
    """An mteb ``AbsTaskRetrieval`` over ``dataset``'s whole corpus and the queries of ``split`` that have qrels.

    ``qrels`` (qid -> {doc id: grade}) replaces ``dataset.qrels[split]``, e.g. to score a run's own test split;
    ``split`` then only names it. ``folder`` is where ``dataset`` was read from, named in errors and recorded as the
    task's dataset path. ``name`` must be unique per collection (it names the result file) and must not be the name
    of one of mteb's own tasks (mteb looks prompts and results up by task name). The dataset revision mteb records
    is a digest of the task's data, so results of different data never look alike.
    """
    from mteb import get_task
    from mteb.abstasks.task_metadata import TaskMetadata

    where = str(folder) if folder is not None else "the dataset (folder not given)"
    if not _TASK_NAME.fullmatch(name):
        raise ValueError(f"task name {name!r}: use letters, digits, '_', '.' or '-', starting with a letter")
    try:
        get_task(name)
    except KeyError:
        pass
    else:
        raise ValueError(f"task name {name!r} is one of mteb's own tasks; choose another (e.g. Local{name})")
    if qrels is None:
        if split not in dataset.qrels:
            raise ValueError(f"split {split!r} of {where}: no qrels (splits with qrels: "
                             f"{', '.join(sorted(dataset.qrels)) or 'none'})")
        qrels = dataset.qrels[split]
    # queries without judgements are dropped, as retrieval.metrics scores only the queries in the qrels (one judged
    # only with grade 0 stays: it scores 0 in both, pytrec_eval counting it as retrieval.metrics does)
    qrels = {qid: dict(docs) for qid, docs in qrels.items() if docs}
    if not qrels:
        raise ValueError(f"split {split!r} of {where}: no queries with relevance judgements")
    unknown_queries = sorted(set(qrels) - set(dataset.queries))
    unknown_docs = sorted({d for docs in qrels.values() for d in docs} - set(dataset.corpus))
    if unknown_queries or unknown_docs:
        raise ValueError(f"split {split!r} of {where}: qrels name unknown query ids {unknown_queries[:5]} / "
                         f"corpus ids {unknown_docs[:5]}")

    doc_ids = list(dataset.corpus)
    # mteb joins title and text itself, exactly as doc_text does; given apart so its files keep the title
    corpus = {"id": doc_ids, "title": [dataset.corpus[d].get("title") or "" for d in doc_ids],
              "text": [dataset.corpus[d]["text"] for d in doc_ids]}
    query_ids = [q for q in dataset.queries if q in qrels]
    queries = {"id": query_ids, "text": [dataset.queries[q]["text"] for q in query_ids]}
    revision = hashlib.sha256(json.dumps([corpus, queries, qrels], sort_keys=True).encode("utf-8")).hexdigest()[:16]

    metadata = TaskMetadata(
        name=name,
        description=f"Local BEIR collection {where}, split {split}: {len(query_ids)} judged queries, "
                    f"{len(doc_ids)} documents.",
        dataset={"path": str(folder) if folder is not None else f"local/{name}", "revision": revision},
        type="Retrieval",
        category="t2t",
        modalities=["text"],
        eval_splits=[split],
        eval_langs=[language],
        main_score="ndcg_at_10",
    )
    # The metadata must be a class attribute: mteb's unload_data drops an instance's own.
    task_class = type(f"LocalRetrieval_{re.sub(r'[^0-9A-Za-z_]', '_', name)}", (_retrieval_task_class(),),
                      {"metadata": metadata})
    task = task_class()
    task._source = (corpus, queries, qrels)
    return task


@cache
def _embedder_wrapper_class():
    from mteb.models import SentenceTransformerEncoderWrapper
    from mteb.types import PromptType

    class EmbedderWrapper(SentenceTransformerEncoderWrapper):
        """mteb's wrapper of the embedder's model whose ``encode`` goes through the embedder: queries and documents
        are encoded as our index and search encode them (same texts in the same order give the same batches, so
        even dynamically quantised int8 vectors are the same; documents hit the embedding cache)."""

        embedder = None

        def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
            texts = [text for batch in inputs for text in batch["text"]]
            if prompt_type == PromptType.query:
                return self.embedder.encode_queries(texts)
            # mteb hands documents over as (title + " " + text).strip(), which doc_text leaves as it is
            return self.embedder.encode_documents([{"text": text} for text in texts])

        def similarity(self, embeddings1, embeddings2):
            """Inner products from faiss's flat kernel, the one our flat indexes search with: the scores are then
            our index's to the last bit, so even near-ties (a model whose vectors barely differ) rank the same and
            what mteb and we are compared on is the metrics."""
            import torch

            return torch.from_numpy(inner_products(np.asarray(embeddings1), np.asarray(embeddings2)))

    return EmbedderWrapper


def _wrap(model, model_name: str | None, embedder=None):
    """mteb's wrapper of a SentenceTransformer, with metadata taken from the model alone (never the hub)."""
    from mteb.models import SentenceTransformerEncoderWrapper

    with warnings.catch_warnings():
        # mteb 2.26 warns that its own default (fill_missing=False, i.e. do not fetch from the hub) is deprecated
        warnings.filterwarnings("ignore", message=".*fill_missing.*", category=DeprecationWarning)
        if embedder is None:
            wrapper = SentenceTransformerEncoderWrapper(model)
        else:
            wrapper = _embedder_wrapper_class()(embedder.model)
            wrapper.embedder = embedder
    if model_name is not None:
        if "/" not in model_name:
            raise ValueError(f"model name {model_name!r}: mteb wants 'organisation/name'")
        wrapper.mteb_model_meta = wrapper.mteb_model_meta.model_copy(update={"name": model_name})
    return wrapper


def evaluate_model(model, tasks, *, output_folder: str | os.PathLike, batch_size: int = 32,
                   model_name: str | None = None, embedder=None) -> dict[str, dict[str, float]]:
    """Score ``model`` (a ``SentenceTransformer``, torch or an ONNX/OpenVINO export) on ``tasks`` with mteb.

    With ``embedder`` (a :class:`retrieval.models.base.Embedder` of ``model``), mteb encodes through it rather than
    through ``model.encode_query`` / ``encode_document`` (which would apply the model's prompts, which our encoders
    do not).

    Returns {task name: {metric: value}} for the metrics of ``MTEB_SCORES``, as mteb reports them (its
    pytrec_eval means are rounded to 5 decimals, MRR is not). mteb's result files are written under
    ``output_folder`` (``results/<model>/<revision>/<task>.json``; ``model_name``, "org/name", names the model
    folder, else mteb's name for the model). Every task is evaluated afresh: a result file left by an earlier run
    is deleted first and never read, so a changed model is never given old scores.
    """
    import mteb
    from mteb.abstasks.abstask import AbsTask

    tasks = [tasks] if isinstance(tasks, AbsTask) else list(tasks)
    names = [task.metadata.name for task in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"tasks need distinct names (their result files are named after them): {names}")
    wrapper = _wrap(model, model_name, embedder)
    cache = mteb.ResultCache(cache_path=Path(output_folder))
    for task in tasks:
        # a stale file would otherwise survive a run that fails before writing this task's result
        cache.get_task_result_path(task.metadata.name, wrapper.mteb_model_meta).unlink(missing_ok=True)
    result = mteb.evaluate(wrapper, tasks, cache=cache, overwrite_strategy="always", co2_tracker=False,
                           encode_kwargs={"batch_size": batch_size, "show_progress_bar": False},
                           show_progress_bar=False, raise_error=True)
    return {task_result.task_name: _main_scores(task_result) for task_result in result.task_results}


def _main_scores(task_result) -> dict[str, float]:
    """Our metrics from a TaskResult of one split and one subset (what local_retrieval_task builds)."""
    (split, subsets), = task_result.scores.items()
    (scores,) = subsets
    missing = [key for key in MTEB_SCORES.values() if key not in scores]
    if missing:
        raise KeyError(f"mteb's scores for {task_result.task_name} ({split}) lack {missing}; it gave "
                       f"{sorted(k for k in scores if isinstance(scores[k], float))}")
    return {ours: float(scores[key]) for ours, key in MTEB_SCORES.items()}


def inner_products(query_vectors: np.ndarray, doc_vectors: np.ndarray) -> np.ndarray:
    """The [queries x documents] inner-product matrix as faiss's flat index computes it."""
    from .dense_index import build_faiss_index

    index = build_faiss_index(np.ascontiguousarray(doc_vectors, dtype=np.float32), "flat")
    scores, rows = index.search(np.ascontiguousarray(query_vectors, dtype=np.float32), len(doc_vectors))
    matrix = np.empty_like(scores)
    np.put_along_axis(matrix, rows, scores, axis=1)
    return matrix


def exact_search(query_vectors: np.ndarray, query_ids: list[str], doc_vectors: np.ndarray, doc_ids: list[str],
                 k: int) -> dict[str, dict[str, float]]:
    """The top ``k`` documents of each query by inner product (faiss flat, as our flat indexes search)."""
    from .dense_index import build_faiss_index

    if len(query_ids) != len(query_vectors) or len(doc_ids) != len(doc_vectors):
        raise ValueError(f"{len(query_ids)} query ids for {len(query_vectors)} vectors, {len(doc_ids)} document ids "
                         f"for {len(doc_vectors)} vectors")
    index = build_faiss_index(np.ascontiguousarray(doc_vectors, dtype=np.float32), "flat")
    scores, rows = index.search(np.ascontiguousarray(query_vectors, dtype=np.float32), min(k, len(doc_ids)))
    return {qid: {doc_ids[r]: float(score) for score, r in zip(score_row, row) if r >= 0}
            for qid, score_row, row in zip(query_ids, scores, rows)}


def score_collection(embedders: Mapping[str, object], dataset: Dataset, *, split: str, name: str,
                     output_folder: str | os.PathLike, batch_size: int, depth: int = 100,
                     qrels: Mapping[str, Mapping[str, int]] | None = None,
                     folder: str | os.PathLike | None = None) -> dict:
    """Every system of ``embedders`` ({system: Embedder}) on one collection, scored by us and by mteb.

    Ours: the queries of ``split`` (or ``qrels``) that have judgements, encoded in the collection's query order,
    searched exactly over the whole corpus (top ``depth``) and scored with ``retrieval.metrics``; mteb: the same
    encoders through :func:`evaluate_model` (result files under ``output_folder``, model folder
    ``retrieval__<system>``). Returns {"num_queries", "num_docs", "systems": {system: {"ours": {metric: value},
    "mteb": {metric: value}, "per_query": {qid: nDCG@10}}}}.
    """
    from .metrics import evaluate, per_query

    task = local_retrieval_task(dataset, split=split, name=name, qrels=qrels, folder=folder)
    _, queries, task_qrels = task._source
    doc_ids = list(dataset.corpus)
    metrics = list(MTEB_SCORES)
    systems = {}
    for system, embedder in embedders.items():
        # the same texts in the same order as mteb asks for them below: the document vectors are read back from the
        # embedding cache there, and queries are few
        doc_vectors = embedder.encode_documents([dataset.corpus[d] for d in doc_ids])
        query_vectors = embedder.encode_queries(list(queries["text"]))
        run = exact_search(query_vectors, list(queries["id"]), doc_vectors, doc_ids, depth)
        mteb_scores = evaluate_model(embedder.model, task, output_folder=output_folder, batch_size=batch_size,
                                     model_name=f"retrieval/{system}", embedder=embedder)[name]
        systems[system] = {"ours": evaluate(task_qrels, run, metrics), "mteb": mteb_scores,
                           "per_query": per_query(task_qrels, run, "ndcg_at_10"), "run": run}
    return {"num_queries": len(task_qrels), "num_docs": len(doc_ids), "systems": systems}


def compare_systems_on(scores: Mapping, *, system: str = "finetuned", against: str = "baseline",
                       tolerance: float = 1e-4, samples: int = 10000, seed: int = 0) -> dict:
    """One row of the generalisation table from :func:`score_collection`'s result: nDCG@10 of both systems (mteb's
    figures), the difference with its 95% bootstrap interval and two-sided paired randomisation p-value (from our
    per-query scores of the same vectors), and whether mteb and we agree within ``tolerance`` on every metric."""
    from .significance import bootstrap_ci, paired_randomization_test

    a, b = scores["systems"][system], scores["systems"][against]
    low, high = bootstrap_ci(a["per_query"], b["per_query"], samples=samples, seed=seed)
    largest = max(abs(result["mteb"][m] - result["ours"][m]) for result in (a, b) for m in MTEB_SCORES)
    return {
        against: b["mteb"]["ndcg_at_10"], system: a["mteb"]["ndcg_at_10"],
        "delta": a["mteb"]["ndcg_at_10"] - b["mteb"]["ndcg_at_10"],
        "ci_low": low, "ci_high": high,
        "p_value": paired_randomization_test(a["per_query"], b["per_query"], samples=samples, seed=seed),
        "num_queries": scores["num_queries"], "num_docs": scores["num_docs"],
        "mteb_vs_ours_max_difference": largest, "mteb_agrees": largest <= tolerance,
    }


COLLECTION_SOURCES = ("beir", "hf", "dir", "mteb")


@dataclass(frozen=True)
class Collection:
    """One entry of ``generalize.datasets``: a BEIR name (the BEIR zip server, or ``RETRIEVAL_DATA_MIRROR``), a local
    BEIR folder (``source: dir``, ``path``), or one of mteb's retrieval tasks (``source: mteb``, e.g. NFCorpus:
    its data comes from the Hugging Face hub)."""

    name: str
    source: str = "beir"
    path: str | None = None
    split: str = "test"

    @classmethod
    def from_params(cls, entry, where: str, default_split: str) -> "Collection":
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: a collection name or a mapping with name, source, path, split; got {entry!r}")
        unknown = sorted(set(entry) - {"name", "source", "path", "split"})
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}: unknown key (keys: name, source, path, split)")
        name = entry.get("name")
        if not isinstance(name, str) or not _TASK_NAME.fullmatch(name):
            raise ValueError(f"{where}.name: {name!r} is not a collection name (letters, digits, '_', '.', '-')")
        source = entry.get("source", "beir")
        if source not in COLLECTION_SOURCES:
            raise ValueError(f"{where}.source: {source!r} is not one of {', '.join(COLLECTION_SOURCES)}")
        if (source == "dir") != bool(entry.get("path")):
            raise ValueError(f"{where}.path: give a folder in BEIR layout for source dir, and only for it")
        return cls(name=name, source=source, path=entry.get("path"), split=str(entry.get("split") or default_split))


@dataclass(frozen=True)
class GeneralizeSettings:
    """params ``generalize``: the collections scored besides this run's test split, their default qrels split, and
    how far mteb's figures may be from ours before the stage fails."""

    datasets: tuple[Collection, ...] = field(default_factory=tuple)
    split: str = "test"
    tolerance: float = 1e-4

    @classmethod
    def from_params(cls, section: Mapping | None) -> "GeneralizeSettings":
        section = dict(section or {})
        unknown = sorted(set(section) - {"datasets", "split", "tolerance"})
        if unknown:
            raise ValueError(f"generalize.{unknown[0]}: unknown key (keys: datasets, split, tolerance)")
        split = str(section.get("split") or "test")
        entries = section.get("datasets") or []
        if not isinstance(entries, list):
            raise ValueError(f"generalize.datasets: a list of collections, got {entries!r}")
        datasets = tuple(Collection.from_params(entry, f"generalize.datasets[{i}]", split)
                         for i, entry in enumerate(entries))
        names = [c.name for c in datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"generalize.datasets: names must be distinct, got {names}")
        tolerance = section.get("tolerance", 1e-4)
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
            raise ValueError(f"generalize.tolerance: a number >= 0, got {tolerance!r}")
        return cls(datasets=datasets, split=split, tolerance=float(tolerance))


def dataset_from_mteb_task(task, split: str) -> Dataset:
    """The corpus, queries and qrels of an mteb retrieval task (loaded by mteb, from the hub for its own tasks) as
    a :class:`Dataset` whose only qrels split is ``split``; a task with several subsets (languages) is refused."""
    name = task.metadata.name
    try:
        task.load_data()
    except Exception as error:  # the hub unreachable, a missing dataset: say which task and how to work around it
        raise RuntimeError(f"mteb task {name}: its data could not be loaded ({type(error).__name__}: {error}); "
                           f"offline, give the collection as a local BEIR folder (source: dir)") from error
    subsets = task.dataset
    if len(subsets) != 1:
        raise ValueError(f"mteb task {name} has subsets {sorted(subsets)}: only single-subset tasks are supported")
    (splits,) = subsets.values()
    if split not in splits:
        raise ValueError(f"mteb task {name}: no split {split!r} (splits: {', '.join(sorted(splits))})")
    data = splits[split]
    corpus = {str(row["id"]): {"title": row.get("title") or "", "text": row["text"]} for row in data["corpus"]}
    queries = {str(row["id"]): {"text": row["text"]} for row in data["queries"]}
    qrels = {str(q): {str(d): int(g) for d, g in docs.items()} for q, docs in data["relevant_docs"].items()}
    return Dataset(corpus=corpus, queries=queries, qrels={split: qrels})
