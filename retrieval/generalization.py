"""Evaluate a sentence-transformers model with mteb 2.x on a local BEIR collection, offline.

mteb is the reference implementation of these numbers, so scoring a model with it is a cross-check of our own
encode -> search -> ``retrieval.metrics`` pipeline, and gives result files in mteb's format.

- :func:`local_retrieval_task` builds an mteb retrieval task from a :class:`retrieval.dataset.Dataset` held in
  memory (no Hugging Face hub: the task sets its data itself, as mteb's mock tasks do).
- :func:`evaluate_model` runs ``mteb.evaluate`` on such tasks and returns their main scores under our metric names.

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
from functools import cache
from pathlib import Path
from typing import Mapping

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


def _wrap(model, model_name: str | None):
    """mteb's wrapper of a SentenceTransformer, with metadata taken from the model alone (never the hub)."""
    from mteb.models import SentenceTransformerEncoderWrapper

    with warnings.catch_warnings():
        # mteb 2.26 warns that its own default (fill_missing=False, i.e. do not fetch from the hub) is deprecated
        warnings.filterwarnings("ignore", message=".*fill_missing.*", category=DeprecationWarning)
        wrapper = SentenceTransformerEncoderWrapper(model)
    if model_name is not None:
        if "/" not in model_name:
            raise ValueError(f"model name {model_name!r}: mteb wants 'organisation/name'")
        wrapper.mteb_model_meta = wrapper.mteb_model_meta.model_copy(update={"name": model_name})
    return wrapper


def evaluate_model(model, tasks, *, output_folder: str | os.PathLike, batch_size: int = 32,
                   model_name: str | None = None) -> dict[str, dict[str, float]]:
    """Score ``model`` (a ``SentenceTransformer``, torch or an ONNX/OpenVINO export) on ``tasks`` with mteb.

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
    wrapper = _wrap(model, model_name)
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

