"""Cross-encoder rerankers (sentence-transformers CrossEncoder): load, rerank a run, fine-tune on mined negatives."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from sentence_transformers import CrossEncoder
from sentence_transformers.cross_encoder.losses import MultipleNegativesRankingLoss

from retrieval.metrics import ranked

VAL_NAME = "val"  # the evaluator's name: its metrics are logged as eval_val_ndcg@10, ...
VAL_AT_K = 10
SAMPLE_KEYS = ("query", "positive", "negative")  # a CrossEncoderRerankingEvaluator sample


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
                        lr: float = 2e-5, seed: int = 42, val_rows: list[dict] | None = None, callbacks=None,
                        checkpoint_dir=None, checkpoint_steps: int = 20, selection: str = "validation",
                        precision: str = "fp32") -> dict:
    """Fine-tune on ``{"query", "positives": [text], "negatives": [text, in BM25 rank order]}`` rows; save to out_dir.

    ``loss="bce"``: (query, positive, 1) and (query, negative, 0) pairs, ``negatives_per_positive`` negatives per
    positive, with BinaryCrossEntropyLoss. ``loss="listwise"``: groups of 1 positive + ``group_size - 1``
    negatives with GroupSoftmaxLoss.

    With ``val_rows`` (same format), nDCG@10 of reranking each row's positives + negatives is scored for the base
    model before the first step and after every epoch; ``selection="validation"`` saves the best of them (the base
    model when training does not beat it), ``"trained"`` the best epoch. Without, the last model is saved.
    (``model`` itself is trained in place: it is the last model, not necessarily the saved one.)
    A full checkpoint (optimizer state included) every ``checkpoint_steps`` steps in ``checkpoint_dir`` lets an
    interrupted run resume, but only one made by the same settings and the very same training examples; without
    ``checkpoint_dir`` a temporary folder is used and nothing resumes. ``precision``: of the training steps (auto:
    bf16 autocast where native, see ``retrieval.precision.trainer_precision_args``); validation stays fp32.
    Returns a summary: loss, examples, steps, mean train loss, whether it resumed, and what validation chose
    (``val_ndcg_at_10_base``, ``_epochs``, ``_best``, ``kept``: "base" | "epoch N" | "last", ``kept_base``).
    """
    from datasets import Dataset
    from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.evaluation import CrossEncoderRerankingEvaluator
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    from ..precision import trainer_precision_args
    from .base import whole_run_training_loss
    from .checkpoints import (KeepBest, check_selection, prepare_checkpoint_dir, rows_fingerprint, save_kept_model,
                              score_final_epoch, selection_summary)

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
    check_selection(selection, "selection")
    if int(checkpoint_steps) < 1:
        raise ValueError(f"checkpoint_steps must be >= 1, got {checkpoint_steps}")
    dataset = Dataset.from_dict(columns)
    if len(dataset) == 0:
        raise ValueError("no training examples: rows need positives (and, for listwise, negatives)")

    evaluator, samples = None, []
    if val_rows:
        samples = [{"query": row["query"], "positive": list(row["positives"]), "negative": _hard_negatives(row)}
                   for row in val_rows if row["positives"]]
        if not samples:
            raise ValueError(f"val_rows: none of the {len(val_rows)} rows has a positive to validate on")
        evaluator = CrossEncoderRerankingEvaluator(samples, at_k=VAL_AT_K, name=VAL_NAME, batch_size=batch_size,
                                                   write_csv=False)
    val_key = f"{VAL_NAME}_ndcg@{VAL_AT_K}"  # the evaluator's own key; the Trainer logs it as eval_<key>

    with tempfile.TemporaryDirectory(prefix="cross-encoder-train-") as scratch:
        # Everything that shapes training, and the examples themselves (their hash, not their count); not
        # checkpoint_steps, which only says how often to save. selection is in, as a kept base must not resume
        # into a run that never keeps it, and so are the validation rows, which the recorded scores came from.
        fingerprint = {"config": {"loss": loss, "negatives_per_positive": negatives_per_positive,
                                  "group_size": group_size, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                                  "seed": seed, "base_model": model.model.name_or_path,
                                  "max_length": model.max_seq_length, "selection": selection,
                                  "precision": precision},
                       "rows": rows_fingerprint(columns),
                       "validation": rows_fingerprint({key: [s[key] for s in samples] for key in SAMPLE_KEYS})
                       if evaluator else None}
        folder, resumable = prepare_checkpoint_dir(checkpoint_dir if checkpoint_dir is not None else scratch,
                                                   fingerprint)
        keeper = KeepBest(folder, f"eval_{val_key}", save=lambda m, path: m.save_pretrained(str(path)),
                          include_base=selection == "validation")
        if evaluator is not None and not keeper.has_base:  # a resumed run scored its base already
            keeper.record("base", evaluator(model)[val_key], model, 0)
        args = CrossEncoderTrainingArguments(
            output_dir=str(folder), num_train_epochs=epochs, per_device_train_batch_size=batch_size, learning_rate=lr,
            seed=seed, data_seed=seed, report_to="none", logging_steps=50, disable_tqdm=False,
            dataloader_pin_memory=False,  # batches are raw text (the loss tokenises): nothing to pin
            eval_strategy="epoch" if evaluator else "no",
            # Full checkpoints (optimizer, scheduler and RNG state too) so that a resumed run goes on as if never
            # stopped; only the latest is kept, KeepBest keeps the best model beside it.
            save_strategy="steps", save_steps=int(checkpoint_steps), save_total_limit=1,
            load_best_model_at_end=False, **trainer_precision_args(precision))
        trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=dataset, loss=loss_fn,
                                      evaluator=evaluator, callbacks=[*(callbacks or ()), keeper])
        result = trainer.train(resume_from_checkpoint=True if resumable else None)
        if evaluator is not None:
            score_final_epoch(keeper, epochs, lambda: evaluator(model)[val_key], model, trainer.state.global_step)
        # no validation: the last model
        save_kept_model(keeper, out_dir, lambda folder: model.save_pretrained(str(folder)))

    return {"loss": loss, "train_examples": len(dataset), "epochs": epochs, "steps": int(result.global_step),
            "train_loss": whole_run_training_loss(result.training_loss, trainer.state.log_history, resumable),
            "resumed": int(resumable), **selection_summary(keeper)}
