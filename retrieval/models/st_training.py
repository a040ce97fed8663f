"""The fine-tuning loop shared by the sentence-transformers families (dense, DPR, SPLADE): the library's trainer
with retrieval validation before the first step and after every epoch, the best of base and epochs kept, seeded,
step checkpoints that resume an interrupted run, and an atomic save."""

from __future__ import annotations

import os

from ..dataset import doc_text
from .base import TrainingData, TrainSettings, settings_dict, whole_run_training_loss


def triplet_columns(data: TrainingData, negatives_per_query: int, *, anchor: str = "anchor",
                    positive: str = "positive", negative: str = "negative") -> dict[str, list[str]]:
    """Columns anchor, positive, negative_1..n (the loss sees every column after the first two as negatives).
    Rows without enough negatives are dropped: the loss needs full rows."""
    columns: dict[str, list[str]] = {anchor: [], positive: []}
    negative_names = [f"{negative}_{i + 1}" for i in range(negatives_per_query)]
    columns.update({name: [] for name in negative_names})
    for example in data.examples:
        negatives = example["negatives"][:negatives_per_query]
        if len(negatives) < negatives_per_query:
            continue
        columns[anchor].append(example["query"])
        columns[positive].append(doc_text(example["positive"]))
        for name, doc in zip(negative_names, negatives):
            columns[name].append(doc_text(doc))
    if not columns[anchor]:
        raise ValueError("no training examples with enough hard negatives: check the mine stage's output and params")
    return columns


def margin_columns(data: TrainingData, negatives_per_query: int, *, anchor: str = "anchor") -> dict[str, list]:
    """:func:`triplet_columns` plus ``label`` = the teacher's [positive score, negative scores...] per row, for
    MarginMSELoss. Rows without enough scored negatives are dropped, as there."""
    rows = [example for example in data.examples if len(example["negatives"]) >= negatives_per_query]
    if any(len(example.get("teacher") or ()) <= negatives_per_query for example in rows):
        raise ValueError("some training examples have no teacher scores for their first "
                         f"{negatives_per_query} negatives: rerun the teacher_scores stage")
    columns = triplet_columns(TrainingData(examples=rows), negatives_per_query, anchor=anchor)
    columns["label"] = [[float(s) for s in example["teacher"][: negatives_per_query + 1]] for example in rows]
    return columns


class ScaledSimilarity:
    """``scale * similarity(a, b)`` row by row: cosine lies in [-1, 1] while cross-encoder logit margins span
    about ten, so Margin-MSE compares the teacher's margins with scaled student margins (the same 20 that
    MultipleNegativesRankingLoss multiplies cosine by)."""

    def __init__(self, pairwise_similarity, scale: float) -> None:
        self.pairwise_similarity, self.scale = pairwise_similarity, float(scale)

    def __call__(self, a, b):
        return self.scale * self.pairwise_similarity(a, b)


def mnrl_loss(scores, scale: float) -> float:
    """MultipleNegativesRankingLoss of one batch: ``scores[i, j]`` is query i against candidate j, and candidate i
    is query i's positive (the others are in-batch positives and hard negatives)."""
    import torch

    # float64: the loss is flat near its optimum, and float32 rounding would blur where the optimum lies.
    return float(torch.nn.functional.cross_entropy(scale * scores.double(), torch.arange(scores.shape[0])))


def mnrl_score_batches(encode_queries, encode_documents, score, columns: dict[str, list], batch_size: int, *,
                       max_rows: int = 256, seed: int = 42):
    """Score matrices of training batches as MNRL sees them: each batch's queries against every positive and hard
    negative of the batch, positives first, from up to ``max_rows`` rows drawn with ``seed``. ``columns`` is query,
    positive, negative_1..n (as ``triplet_columns``); ``encode_queries`` / ``encode_documents`` map a list of one
    column's items to a [rows, dim] tensor and ``score(queries, candidates)`` gives the model's similarity matrix."""
    import random

    import torch

    names = list(columns)
    rows = list(range(len(columns[names[0]])))
    random.Random(seed).shuffle(rows)
    rows = rows[:max_rows]
    queries = encode_queries([columns[names[0]][i] for i in rows])
    documents = [encode_documents([columns[name][i] for i in rows]) for name in names[1:]]
    for start in range(0, len(rows), batch_size):
        end = start + batch_size
        yield score(queries[start:end], torch.cat([docs[start:end] for docs in documents]))


def calibrated_mnrl_scale(score_batches, *, low: float = 1e-3, high: float = 1e3, steps: int = 60) -> float:
    """The scale (1 / temperature) at which the mean MNRL loss over ``score_batches`` is lowest.

    Why: MNRL over raw dot products is only well posed at the scale the model's scores live on. Started far from
    that optimum, the first thing training does is move every score towards it: a SPLADE shrinks (or inflates) all
    its term weights, pruning (or adding) expansion terms wholesale instead of learning the domain. The loss is convex
    in the scale, so a golden-section search over log(scale) finds the optimum. Batches the model already ranks
    perfectly have none (the loss falls for ever): the search then stops where the loss is flat, at a large scale."""
    import math

    batches = list(score_batches)
    if not batches:
        raise ValueError("no score batches to calibrate the MNRL scale on")

    def mean_loss(log_scale: float) -> float:
        return sum(mnrl_loss(batch, math.exp(log_scale)) for batch in batches) / len(batches)

    ratio = (math.sqrt(5) - 1) / 2
    a, b = math.log(low), math.log(high)
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = mean_loss(c), mean_loss(d)
    for _ in range(steps):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = mean_loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = mean_loss(d)
    return math.exp((a + b) / 2)


def fit(model, loss, train_columns: dict[str, list[str]], validator, settings: TrainSettings, *,
        config: dict, out_dir: str | os.PathLike, checkpoint_dir: str | os.PathLike, callbacks=(),
        trainer_cls=None, args_cls=None, extra_args: dict | None = None) -> dict:
    """Train ``model`` with ``loss`` and save the model selected on validation to ``out_dir``.

    ``validator`` (a :class:`retrieval.models.validation.RetrievalValidator`) scores the base model before the first
    step and the model after every epoch; with ``settings.selection == "validation"`` the best of them is kept, so
    training that hurts on validation ships the base model (and says so); ``"trained"`` keeps the best epoch.
    Checkpoints every ``settings.checkpoint_steps`` steps resume an interrupted run, but only one made from the same
    configuration and the very same training rows (their hash, not their count). Returns a summary."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.training_args import BatchSamplers

    from ..precision import trainer_precision_args
    from .checkpoints import (KeepBest, check_selection, prepare_checkpoint_dir, rows_fingerprint, save_kept_model,
                              score_final_epoch, selection_summary)

    check_selection(settings.selection, "train.selection")
    trainer_cls = trainer_cls or SentenceTransformerTrainer
    args_cls = args_cls or SentenceTransformerTrainingArguments
    train_dataset = Dataset.from_dict(train_columns)
    folder, resumable = prepare_checkpoint_dir(
        checkpoint_dir, {"config": dict(config), "settings": settings_dict(settings),
                         "rows": rows_fingerprint(train_columns), "validation": validator.task}
    )
    keeper = KeepBest(folder, f"eval_{validator.primary_metric}", save=lambda m, path: m.save_pretrained(str(path)),
                      include_base=settings.selection == "validation")
    if not keeper.has_base:  # a resumed run scored its base already
        keeper.record("base", validator.score_base(model), model, 0)
    args = args_cls(
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
        save_strategy="steps",
        save_steps=max(1, int(settings.checkpoint_steps)),
        save_total_limit=1,
        # KeepBest keeps the best model (the Trainer's own choice could not consider the base model).
        load_best_model_at_end=False,
        logging_steps=5,
        report_to="none",
        disable_tqdm=False,
        dataloader_pin_memory=False,
        **trainer_precision_args(settings.precision),
        **(extra_args or {}),
    )
    trainer = trainer_cls(model=model, args=args, train_dataset=train_dataset, loss=loss, evaluator=validator,
                          callbacks=[*callbacks, keeper])
    result = trainer.train(resume_from_checkpoint=True if resumable else None)
    score_final_epoch(keeper, settings.epochs, lambda: validator(model)[validator.primary_metric], model,
                      trainer.state.global_step)
    # no epoch scored (selection "trained" and no validation pass ran): the last model
    save_kept_model(keeper, out_dir, lambda folder: trainer.model.save_pretrained(str(folder)))
    return {
        "train_examples": len(train_dataset),
        "steps": int(result.global_step),
        "train_loss": whole_run_training_loss(result.training_loss, trainer.state.log_history, resumable),
        **selection_summary(keeper),
        "resumed": resumable,
    }
