"""Dense bi-encoder (sentence-transformers), fine-tuned with MultipleNegativesRankingLoss over
(query, positive, hard negatives), searched with faiss."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from ..dataset import doc_text
from ..dense_index import FaissSearcher, build_faiss_index, read_index_info, save_dense_index
from ..hub import resolve_model
from ..io import atomic_dir
from .base import TrainingData, TrainSettings, prepare_checkpoint_dir, settings_dict

TRAINABLE = True


def load(model_ref: str, config: Mapping | None = None):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(resolve_model(model_ref), device=(config or {}).get("device"))
    if config and config.get("max_seq_length"):
        model.max_seq_length = int(config["max_seq_length"])
    return model


def _normalizes(model) -> bool:
    """Whether scores should be cosine: then vectors are normalised and inner product equals cosine."""
    return model.similarity_fn_name == "cosine"


def encode(model, texts: list[str], *, batch_size: int = 64, progress: bool = True) -> np.ndarray:
    return model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=progress,
                        normalize_embeddings=_normalizes(model)).astype(np.float32)


def _triplets(data: TrainingData, negatives_per_query: int):
    """Columns anchor, positive, negative_1..n; rows without enough negatives are dropped (MNRL needs a full row)."""
    from datasets import Dataset

    columns: dict[str, list[str]] = {"anchor": [], "positive": []}
    columns.update({f"negative_{i + 1}": [] for i in range(negatives_per_query)})
    for example in data.examples:
        negatives = example["negatives"][:negatives_per_query]
        if len(negatives) < negatives_per_query:
            continue
        columns["anchor"].append(example["query"])
        columns["positive"].append(doc_text(example["positive"]))
        for i, negative in enumerate(negatives):
            columns[f"negative_{i + 1}"].append(doc_text(negative))
    if not columns["anchor"]:
        raise ValueError("no training examples with enough hard negatives: check the mine stage's output and params")
    return Dataset.from_dict(columns)


def train(config: Mapping, data: TrainingData, out_dir: str | os.PathLike, settings: TrainSettings, *,
          checkpoint_dir: str | os.PathLike, callbacks=()) -> dict:
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    from sentence_transformers.training_args import BatchSamplers
    from transformers import set_seed

    set_seed(settings.seed)
    model = load(config["base_model"], config)
    train_dataset = _triplets(data, settings.negatives_per_query)
    evaluator = InformationRetrievalEvaluator(
        queries=data.val_queries,
        corpus={doc_id: doc_text(doc) for doc_id, doc in data.val_corpus.items()},
        relevant_docs={q: {d for d, g in docs.items() if g > 0} for q, docs in data.val_qrels.items()},
        name="val", ndcg_at_k=[10], mrr_at_k=[10], accuracy_at_k=[1], precision_recall_at_k=[10], map_at_k=[100],
        batch_size=int(config.get("encode_batch_size", 64)), show_progress_bar=False,
    )
    # The evaluator names its main score after the model's similarity, e.g. "val_cosine_ndcg@10".
    best_metric = f"eval_val_{model.similarity_fn_name}_ndcg@10"

    folder, resumable = prepare_checkpoint_dir(
        checkpoint_dir, {"config": dict(config), "settings": settings_dict(settings), "rows": len(train_dataset)}
    )
    args = SentenceTransformerTrainingArguments(
        output_dir=str(folder),
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        warmup_ratio=settings.warmup_ratio,
        seed=settings.seed,
        data_seed=settings.seed,
        # Two queries sharing a positive in one batch would make it a false in-batch negative.
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model=best_metric,
        greater_is_better=True,
        logging_steps=5,
        report_to="none",
        disable_tqdm=False,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=train_dataset, loss=MultipleNegativesRankingLoss(model),
        evaluator=evaluator, callbacks=list(callbacks),
    )
    result = trainer.train(resume_from_checkpoint=True if resumable else None)
    with atomic_dir(out_dir) as tmp:
        trainer.model.save_pretrained(str(tmp))
    return {
        "family": "dense",
        "base_model": config["base_model"],
        "train_examples": len(train_dataset),
        "steps": int(result.global_step),
        "train_loss": float(result.training_loss),
        "val_ndcg_at_10_best": float(trainer.state.best_metric),
        "resumed": resumable,
    }


def build_index(model_ref: str, corpus: Mapping[str, dict], index_dir: str | os.PathLike, config: Mapping) -> dict:
    model = load(model_ref, config)
    doc_ids = list(corpus)
    embeddings = encode(model, [doc_text(corpus[d]) for d in doc_ids], batch_size=int(config.get("encode_batch_size", 64)))
    faiss_config = config.get("faiss", {}) or {}
    kind = faiss_config.get("kind", "flat")
    index = build_faiss_index(embeddings, kind, **{k: v for k, v in faiss_config.items() if k in
                                                   ("hnsw_m", "hnsw_ef_construction", "ivf_nlist", "pq_m")})
    save_dense_index(index, doc_ids, index_dir, {"encoder": str(model_ref), "kind": kind, "dim": int(embeddings.shape[1]),
                                                 "normalized": _normalizes(model)})
    return {"num_docs": len(doc_ids), "dim": int(embeddings.shape[1]), "kind": kind,
            "index_bytes": (Path(index_dir) / "index.faiss").stat().st_size}


def search(index_dir: str | os.PathLike, queries: Mapping[str, str], k: int, config: Mapping) -> dict:
    faiss_config = config.get("faiss", {}) or {}
    searcher = FaissSearcher(index_dir, **{k_: v for k_, v in faiss_config.items() if k_ in ("hnsw_ef_search", "ivf_nprobe")})
    model = load(read_index_info(index_dir)["encoder"], config)
    qids = list(queries)
    vectors = encode(model, [queries[q] for q in qids], batch_size=int(config.get("encode_batch_size", 64)))
    return searcher.batch_search(vectors, qids, k)
