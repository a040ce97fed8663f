"""DPR family on the tiny fixture: DPR hub checkpoints load through their inner BERT; train (resumed after an
interruption) -> save -> reload -> index -> search."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from retrieval.dataset import doc_text, load_beir
from retrieval.models import dpr
from retrieval.models.base import TrainingData, TrainSettings
from tiny import corpus_texts, write_tiny_bert, write_tiny_dataset


pytestmark = pytest.mark.single_torch_thread


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpr")
    data_dir = write_tiny_dataset(root / "data")
    write_tiny_bert(root / "model", corpus_texts(data_dir))
    bert = root / "model" / "bert"
    # Dropout keeps a 32-wide random BERT's CLS vectors from learning anything in a few dozen steps.
    config = json.loads((bert / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (bert / "config.json").write_text(json.dumps(config))
    return load_beir(data_dir), bert


def training_data(dataset) -> TrainingData:
    """Train qrels as (query, positive) with two negatives from the next topic; validation on a third of the
    training queries (so the kept best epoch is the one that learnt them best)."""
    topics = list(dict.fromkeys(d.rstrip("0123456789") for d in dataset.corpus))

    def negatives(doc_id: str) -> list[dict]:
        other = topics[(topics.index(doc_id.rstrip("0123456789")) + 1) % len(topics)]
        return [dataset.corpus[f"{other}{i}"] for i in range(2)]

    examples = [{"query": dataset.queries[q]["text"], "positive": dataset.corpus[d], "negatives": negatives(d)}
                for q, docs in dataset.qrels["train"].items() for d in docs]
    val = list(dataset.qrels["train"])[::3]
    return TrainingData(examples, val_queries={q: dataset.queries[q]["text"] for q in val},
                        val_corpus=dataset.corpus, val_qrels={q: dataset.qrels["train"][q] for q in val})


class Crash(RuntimeError):
    pass


class StopAfterFirstSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        raise Crash("simulated crash after the first epoch's checkpoint")


@pytest.mark.parametrize("projection_dim", [0, 16])
def test_dpr_checkpoints_load_through_their_inner_bert(fixture, tmp_path, projection_dim):
    from transformers import BertTokenizerFast, DPRConfig, DPRContextEncoder, DPRQuestionEncoder

    _, bert = fixture
    tokenizer = BertTokenizerFast.from_pretrained(bert)
    config = DPRConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=128, projection_dim=projection_dim)
    torch.manual_seed(0)
    reference = {"question": DPRQuestionEncoder(config).eval(), "ctx": DPRContextEncoder(config).eval()}
    for name, encoder in reference.items():
        encoder.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)

    model = dpr.load(None, {"query_model": str(tmp_path / "question"), "passage_model": str(tmp_path / "ctx"),
                            "max_seq_length": 64})
    assert model.similarity_fn_name == "dot"
    texts = ["heart heartmarker1 cardiac artery", "lung pulmonary airway asthma"]
    features = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want_query = reference["question"](**features).pooler_output.numpy()
        want_passage = reference["ctx"](**features).pooler_output.numpy()
    np.testing.assert_allclose(dpr.encode_queries(model, texts, progress=False), want_query, atol=1e-5)
    np.testing.assert_allclose(dpr.encode_passages(model, texts, progress=False), want_passage, atol=1e-5)
    assert want_query.shape[1] == (projection_dim or 32)


def test_train_resume_save_reload_index_search(fixture, tmp_path):
    dataset, bert = fixture
    config = {"base_model": str(bert), "max_seq_length": 64, "encode_batch_size": 16}
    data = training_data(dataset)
    settings = TrainSettings(epochs=30, batch_size=8, learning_rate=3e-3, warmup_ratio=0.1, negatives_per_query=1, seed=0)
    queries = {q: dataset.queries[q]["text"] for q in dataset.queries}
    pairs = [(queries[q], dataset.corpus[d]) for q, docs in dataset.qrels["train"].items() for d in docs]

    def pair_scores(model) -> np.ndarray:
        q = dpr.encode_queries(model, [p[0] for p in pairs], progress=False)
        d = dpr.encode_passages(model, [f"{p[1]['title']} {p[1]['text']}" for p in pairs], progress=False)
        return (q * d).sum(1)

    before = pair_scores(dpr.load(str(bert), config))
    with pytest.raises(Crash):
        dpr.train(config, data, tmp_path / "model", settings, checkpoint_dir=tmp_path / "checkpoints",
                  callbacks=[StopAfterFirstSave()])
    assert not (tmp_path / "model").exists()
    summary = dpr.train(config, data, tmp_path / "model", settings, checkpoint_dir=tmp_path / "checkpoints")
    assert summary["resumed"] and summary["steps"] == 30 * math.ceil(36 / 8)
    assert summary["train_examples"] == 36 and math.isfinite(summary["train_loss"]) and summary["train_loss"] > 0

    assert dpr.is_saved_model(tmp_path / "model")
    model = dpr.load(str(tmp_path / "model"), config)
    assert model.similarity_fn_name == "dot"
    after = pair_scores(model)
    assert not np.allclose(before, after)

    stats = dpr.build_index(str(tmp_path / "model"), dataset.corpus, tmp_path / "index", config)
    assert stats["num_docs"] == len(dataset.corpus) and stats["dim"] == 32
    info = json.loads((tmp_path / "index" / "index.json").read_text())
    assert info["encoder"] == str(tmp_path / "model") and info["similarity"] == "dot"
    results = dpr.search(tmp_path / "index", queries, 5, config)
    assert set(results) == set(queries)
    for hits in results.values():
        assert len(hits) == 5 and [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    # Most training queries find their document in the top 5 (chance: 5 in 48). Not one named query: the resumed
    # run is not bit-for-bit repeatable across thread schedules, so a single query's rank may move.
    train_hits = [any(d in docs for d, _ in results[q]) for q, docs in dataset.qrels["train"].items()]
    assert sum(train_hits) >= 0.6 * len(train_hits), sum(train_hits) / len(train_hits)


def test_baseline_index_records_its_towers(fixture, tmp_path):
    """The baseline (model_ref = base model, or "None" when only the DPR pair is configured) indexes with the
    passage tower and searches with the question tower of the same configured model."""
    dataset, bert = fixture
    config = {"query_model": str(bert), "passage_model": str(bert), "base_model": None, "max_seq_length": 64}
    assert dpr.tower_refs(config, "None") == (str(bert), str(bert))
    assert dpr.tower_refs({}, "None") == (dpr.DEFAULT_QUERY_MODEL, dpr.DEFAULT_PASSAGE_MODEL)
    assert dpr.tower_refs({"base_model": "m"}, "m") == ("m", "m")
    dpr.build_index("None", dataset.corpus, tmp_path / "index", config)
    info = json.loads((tmp_path / "index" / "index.json").read_text())
    assert info["encoder"] is None and info["towers"] == [str(bert), str(bert)]
    results = dpr.search(tmp_path / "index", {"q1": "heart heartmarker1"}, 3, config)
    # The hits are the exact top 3 by dot product of the question tower's query vector with the passage tower's
    # document vectors, computed here without the index.
    model = dpr.build_model(str(bert), str(bert), max_seq_length=64)
    doc_ids = list(dataset.corpus)
    docs = dpr.encode_passages(model, [doc_text(dataset.corpus[d]) for d in doc_ids], progress=False)
    query = dpr.encode_queries(model, ["heart heartmarker1"], progress=False)[0]
    exact = docs @ query
    top = np.argsort(-exact)[:3]
    # Each hit carries its document's exact score, and the hits are the 3 best scores; documents whose scores tie
    # to float rounding (faiss's kernel against numpy's product) may come in either order.
    hit_scores = [s for _, s in results["q1"]]
    np.testing.assert_allclose(hit_scores, [exact[doc_ids.index(d)] for d, _ in results["q1"]], rtol=1e-4)
    np.testing.assert_allclose(hit_scores, exact[top], rtol=1e-4)


def test_dpr_defaults_offline_point_to_base_model(monkeypatch):
    import retrieval.hub
    from retrieval.hub import ModelNotAvailable, hub_reachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(retrieval.hub, "_in_hub_cache", lambda model_id: False)
    hub_reachable.cache_clear()
    try:
        with pytest.raises(ModelNotAvailable, match="models.dpr.base_model"):
            dpr.load(None, {})
    finally:
        hub_reachable.cache_clear()
