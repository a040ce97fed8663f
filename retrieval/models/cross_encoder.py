"""Cross-encoder rerankers (sentence-transformers CrossEncoder): load, rerank a run, fine-tune on mined negatives."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from sentence_transformers import CrossEncoder
from sentence_transformers.cross_encoder.losses import MultipleNegativesRankingLoss

from retrieval.io import atomic_dir
from retrieval.metrics import ranked

VAL_NAME = "val"  # the evaluator's name: its metrics are logged as eval_val_ndcg@10, ...
VAL_AT_K = 10


def load_cross_encoder(name_or_path, max_length: int = 512) -> CrossEncoder:
    """A CrossEncoder from a saved folder (offline) or a hub id; pairs are truncated to ``max_length`` tokens."""
    return CrossEncoder(str(name_or_path), max_length=max_length, local_files_only=Path(name_or_path).is_dir())


def rerank(model: CrossEncoder, queries: dict[str, str], run: dict[str, dict[str, float]], doc_texts: dict[str, str],
           *, top_k: int = 100, batch_size: int = 32, show_progress: bool = True) -> dict[str, dict[str, float]]:
    """Rescore each query's ``top_k`` documents (in trec_eval order) with the model; documents below are dropped.

    Scores are raw logits: the model's default Sigmoid ranks the same but saturates to 1.0 in float32 for
    confident pairs, which would turn distinct scores into ties.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    candidates = {qid: ranked(run[qid])[:top_k] for qid in sorted(run)}
    if missing := sorted(qid for qid in candidates if qid not in queries):
        raise KeyError(f"{len(missing)} run queries have no text, e.g. {missing[:5]}")
    if missing := sorted({doc for docs in candidates.values() for doc in docs if doc not in doc_texts}):
        raise KeyError(f"{len(missing)} run documents have no text, e.g. {missing[:5]}")
    # All pairs in one predict call: full batches across queries and a single progress bar.
    pairs = [(queries[qid], doc_texts[doc]) for qid, docs in candidates.items() for doc in docs]
    scores = iter(score_pairs(model, pairs, batch_size=batch_size, show_progress=show_progress))
    return {qid: {doc: next(scores) for doc in docs} for qid, docs in candidates.items()}


def score_pairs(model: CrossEncoder, pairs: list[tuple[str, str]], *, batch_size: int = 32,
                show_progress: bool = True) -> list[float]:
    """Raw logits of (query, document) pairs (see :func:`rerank` for why not the Sigmoid)."""
    if not pairs:
        return []
    return model.predict(pairs, batch_size=batch_size, show_progress_bar=show_progress,
                         activation_fn=torch.nn.Identity(), convert_to_numpy=True).tolist()


class GroupSoftmaxLoss(MultipleNegativesRankingLoss):
    """Softmax cross-entropy over one group per row, (query, positive, negative_1, ..., negative_n), with the positive
    as the target class: the "localised contrastive estimation" loss for rerankers (Gao et al., ECIR 2021).

    sentence-transformers' own losses do not quite fit: ``MultipleNegativesRankingLoss`` always adds random
    in-batch negatives (``num_negatives=0`` fails in ``torch.multinomial``) and squashes logits through
    Sigmoid x 10; ``ListNetLoss`` with labels [1, 0, ..., 0] targets softmax([1, 0, ...]), not the one-hot
    positive. So this is MultipleNegativesRankingLoss without in-batch negatives, on raw logits.
    """

    def __init__(self, model: CrossEncoder) -> None:
        super().__init__(model, num_negatives=None, scale=1.0, activation_fn=torch.nn.Identity())

    def get_in_batch_negatives(self, anchors, candidates):
        return iter(())


def _hard_negatives(row: dict) -> list[str]:
    """The row's negatives in the given (BM25 rank) order, without duplicates or texts that are also positives."""
    positives = set(row["positives"])
    return [text for text in dict.fromkeys(row["negatives"]) if text not in positives]


def _bce_dataset(train_rows: list[dict], negatives_per_positive: int) -> dict[str, list]:
    columns = {"query": [], "document": [], "label": []}

    def add(query, document, label):
        columns["query"].append(query), columns["document"].append(document), columns["label"].append(label)

    for row in train_rows:
        negatives = _hard_negatives(row)
        count = min(negatives_per_positive, len(negatives))
        for i, positive in enumerate(row["positives"]):
            add(row["query"], positive, 1.0)
            # Positive i takes the next `count` negatives, hardest first, so that the positives of one query
            # share out its negatives before any is used twice.
            for j in range(count):
                add(row["query"], negatives[(i * count + j) % len(negatives)], 0.0)
    return columns


def _listwise_dataset(train_rows: list[dict], group_size: int) -> dict[str, list]:
    width = group_size - 1
    columns = {"query": [], "positive": [], **{f"negative_{j + 1}": [] for j in range(width)}}
    for row in train_rows:
        negatives = _hard_negatives(row)
        if not negatives:
            continue  # no group without a negative
        for i, positive in enumerate(row["positives"]):
            columns["query"].append(row["query"])
            columns["positive"].append(positive)
            # As for bce; a query with fewer than group_size - 1 negatives repeats some, as groups are columns
            # and so must all be the same size.
            for j in range(width):
                columns[f"negative_{j + 1}"].append(negatives[(i * width + j) % len(negatives)])
    return columns


def train_cross_encoder(model: CrossEncoder, train_rows: list[dict], out_dir, *, loss: str = "bce",
                        negatives_per_positive: int = 2, group_size: int = 4, epochs: int = 1, batch_size: int = 16,
                        lr: float = 2e-5, seed: int = 42, val_rows: list[dict] | None = None, callbacks=None) -> dict:
    """Fine-tune on ``{"query", "positives": [text], "negatives": [text, in BM25 rank order]}`` rows; save to out_dir.

    ``loss="bce"``: (query, positive, 1) and (query, negative, 0) pairs, ``negatives_per_positive`` negatives per
    positive, with BinaryCrossEntropyLoss. ``loss="listwise"``: groups of 1 positive + ``group_size - 1``
    negatives with GroupSoftmaxLoss. With ``val_rows`` (same format) nDCG@10 of reranking each row's positives +
    negatives is evaluated after every epoch and the best epoch's model is the one saved.
    Returns a summary: loss, examples, steps, mean train loss, and per-epoch / best validation nDCG@10.
    """
    from datasets import Dataset
    from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.evaluation import CrossEncoderRerankingEvaluator
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    if loss == "bce":
        if negatives_per_positive < 1:
            raise ValueError(f"negatives_per_positive must be >= 1, got {negatives_per_positive}")
        columns, loss_fn = _bce_dataset(train_rows, negatives_per_positive), BinaryCrossEntropyLoss(model)
    elif loss == "listwise":
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 (a positive and a negative), got {group_size}")
        columns, loss_fn = _listwise_dataset(train_rows, group_size), GroupSoftmaxLoss(model)
    else:
        raise ValueError(f"unknown loss {loss!r}: choose 'bce' or 'listwise'")
    dataset = Dataset.from_dict(columns)
    if len(dataset) == 0:
        raise ValueError("no training examples: rows need positives (and, for listwise, negatives)")

    evaluator = None
    if val_rows:
        samples = [{"query": row["query"], "positive": list(row["positives"]), "negative": _hard_negatives(row)}
                   for row in val_rows if row["positives"]]
        evaluator = CrossEncoderRerankingEvaluator(samples, at_k=VAL_AT_K, name=VAL_NAME, batch_size=batch_size,
                                                   write_csv=False)
    val_metric = f"eval_{VAL_NAME}_ndcg@{VAL_AT_K}"

    with tempfile.TemporaryDirectory(prefix="cross-encoder-train-") as scratch:
        per_epoch = "epoch" if evaluator else "no"
        args = CrossEncoderTrainingArguments(
            output_dir=scratch, num_train_epochs=epochs, per_device_train_batch_size=batch_size, learning_rate=lr,
            seed=seed, data_seed=seed, report_to="none", logging_steps=50, disable_tqdm=False,
            dataloader_pin_memory=False,  # batches are raw text (the loss tokenises): nothing to pin
            eval_strategy=per_epoch, save_strategy=per_epoch,
            # Checkpoints exist only to restore the best epoch: no optimizer state, at most best + latest on disk.
            save_only_model=True, save_total_limit=1, load_best_model_at_end=evaluator is not None,
            metric_for_best_model=val_metric if evaluator else None, greater_is_better=True)
        trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=dataset, loss=loss_fn,
                                      evaluator=evaluator, callbacks=callbacks)
        result = trainer.train()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))

    summary = {"loss": loss, "train_examples": len(dataset), "epochs": epochs, "steps": trainer.state.global_step,
               "train_loss": result.training_loss}
    if evaluator:
        summary[f"val_ndcg_at_{VAL_AT_K}_per_epoch"] = [log[val_metric] for log in trainer.state.log_history
                                                         if val_metric in log]
        summary[f"best_val_ndcg_at_{VAL_AT_K}"] = trainer.state.best_metric
    return summary
