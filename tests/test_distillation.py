"""Distillation: teacher pairs and scores, Margin-MSE columns, and a dense model that learns a teacher's margins."""

from __future__ import annotations

import math

import pytest
import torch

from retrieval.dataset import load_beir
from retrieval.distillation import attach_teacher_scores, score_records, teacher_pairs
from retrieval.models import dense
from retrieval.models.base import TrainingData, TrainSettings
from retrieval.models.st_training import ScaledSimilarity, margin_columns
from tiny import corpus_texts, write_tiny_bert, write_tiny_dataset

RECORDS = [
    {"query_id": "q1", "query": "heart attack", "positives": [{"doc_id": "a", "grade": 1}, {"doc_id": "b", "grade": 1}],
     "negatives": [{"doc_id": "c", "rank": 1}, {"doc_id": "d", "rank": 2}, {"doc_id": "e", "rank": 3}]},
    {"query_id": "q2", "query": "lung", "positives": [{"doc_id": "c", "grade": 1}],
     "negatives": [{"doc_id": "a", "rank": 1}]},
]
CORPUS = {d: {"title": d.upper(), "text": f"text of {d}"} for d in "abcde"}


def test_teacher_pairs_are_positives_and_the_first_negatives():
    assert teacher_pairs(RECORDS, 2) == [("q1", "a"), ("q1", "b"), ("q1", "c"), ("q1", "d"), ("q2", "c"), ("q2", "a")]
    assert teacher_pairs(RECORDS, 1) == [("q1", "a"), ("q1", "b"), ("q1", "c"), ("q2", "c"), ("q2", "a")]
    with pytest.raises(ValueError, match="negatives_per_query"):
        teacher_pairs(RECORDS, 0)


def test_score_records_groups_scores_by_query():
    seen = []

    def length_scorer(pairs):  # a deterministic teacher: score = document length
        seen.extend(pairs)
        return [float(len(doc)) for _, doc in pairs]

    scored = score_records(length_scorer, RECORDS, CORPUS, 1)
    assert seen[0] == ("heart attack", "A text of a")  # title + text, as every model sees documents
    assert scored == [{"query_id": "q1", "scores": {"a": 11.0, "b": 11.0, "c": 11.0}},
                      {"query_id": "q2", "scores": {"c": 11.0, "a": 11.0}}]
    with pytest.raises(ValueError, match="returned 1 scores for 5 pairs"):
        score_records(lambda pairs: [0.0], RECORDS, CORPUS, 1)
    with pytest.raises(KeyError, match="not in the corpus"):
        score_records(length_scorer, RECORDS, {"a": CORPUS["a"]}, 1)


def test_attach_teacher_scores_orders_positive_then_negatives():
    examples = [{"query_id": "q1", "positive_id": "b", "negative_ids": ["c", "d", "e"]}]
    scores = {"q1": {"a": 9.0, "b": 8.0, "c": 1.0, "d": -2.0}}
    assert attach_teacher_scores(examples, scores)[0]["teacher"] == [8.0, 1.0, -2.0]  # e unscored: list ends
    with pytest.raises(KeyError, match="no teacher score for query 'q1' and its positive 'z'"):
        attach_teacher_scores([{"query_id": "q1", "positive_id": "z", "negative_ids": []}], scores)


def test_margin_columns_carry_the_teacher_scores_row_by_row():
    doc = {"title": "", "text": "x"}
    data = TrainingData(examples=[
        {"query": "q1", "positive": {"title": "", "text": "p1"}, "negatives": [doc, doc], "teacher": [5.0, 1.0, 0.5]},
        {"query": "q2", "positive": {"title": "", "text": "p2"}, "negatives": [doc], "teacher": [4.0, 3.0]},
    ])
    columns = margin_columns(data, 1, anchor="query")
    assert columns["query"] == ["q1", "q2"] and columns["positive"] == ["p1", "p2"]
    assert columns["label"] == [[5.0, 1.0], [4.0, 3.0]]
    # q2 has one negative only: dropped for two, as triplet_columns drops it
    assert margin_columns(data, 2, anchor="query")["label"] == [[5.0, 1.0, 0.5]]
    data.examples[0]["teacher"] = [5.0]
    with pytest.raises(ValueError, match="no teacher scores"):
        margin_columns(data, 1)


def test_scaled_similarity_multiplies_row_similarities():
    from sentence_transformers import util

    a = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    b = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    assert ScaledSimilarity(util.pairwise_cos_sim, 20)(a, b).tolist() == pytest.approx([0.0, 20.0])
    assert ScaledSimilarity(util.pairwise_dot_score, 0.5)(a, 2 * b).tolist() == pytest.approx([0.0, 1.0])


def test_dense_model_learns_the_teachers_margins(tmp_path):
    """Teacher: positive 4.0, negatives 0.0. After Margin-MSE training the student's scaled margins move towards 4."""
    torch.set_num_threads(1)
    data_dir = write_tiny_dataset(tmp_path / "data")
    model_dir = write_tiny_bert(tmp_path / "model", corpus_texts(data_dir))
    dataset = load_beir(data_dir)
    topics = sorted({d.rstrip("0123456789") for d in dataset.corpus})
    examples = []
    for qid, docs in dataset.qrels["train"].items():
        for doc_id in docs:
            topic = doc_id.rstrip("0123456789")
            negative = f"{topics[(topics.index(topic) + 1) % len(topics)]}0"
            examples.append({"query": dataset.queries[qid]["text"], "positive": dataset.corpus[doc_id],
                             "negatives": [dataset.corpus[negative]], "teacher": [4.0, 0.0]})
    val = list(dataset.qrels["train"])[:8]
    data = TrainingData(examples, val_queries={q: dataset.queries[q]["text"] for q in val},
                        val_corpus=dataset.corpus, val_qrels={q: dataset.qrels["train"][q] for q in val})
    settings = TrainSettings(epochs=8, batch_size=8, learning_rate=5e-3, warmup_ratio=0.0, distill=True,
                             distill_scale=20.0)
    config = {"base_model": str(model_dir), "max_seq_length": 64, "encode_batch_size": 16}

    def mean_error(model_ref) -> float:
        model = dense.load(model_ref, config)
        columns = margin_columns(data, 1)
        q, p, n = (torch.tensor(dense.encode(model, columns[c], progress=False))
                   for c in ("anchor", "positive", "negative_1"))
        margins = 20.0 * (torch.nn.functional.cosine_similarity(q, p) - torch.nn.functional.cosine_similarity(q, n))
        return float(((margins - 4.0) ** 2).mean())

    before = mean_error(str(model_dir))
    summary = dense.train(config, data, tmp_path / "out", settings, checkpoint_dir=tmp_path / "ckpt")
    # 36 training queries with one judged document each, in batches of 8 (the last one short), for 8 epochs
    assert len(examples) == 36 and summary["loss"] == "margin_mse" and summary["steps"] == 8 * math.ceil(36 / 8)
    after = mean_error(str(tmp_path / "out"))
    assert after < 0.5 * before, (before, after)
