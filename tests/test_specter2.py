"""SPECTER2 family on the tiny fixture (fresh adapters, as offline): query and document adapters are separate
paths; train_body false trains only them; train (resumed after an interruption) -> save -> reload -> index ->
search; the Euclidean-distance index finds the nearest documents."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import BertModel, TrainerCallback

from retrieval.dataset import load_beir
from retrieval.hub import hub_reachable
from retrieval.models import specter2
from retrieval.models.base import TrainingData, TrainSettings
from tiny import corpus_texts, write_tiny_bert, write_tiny_dataset


pytestmark = pytest.mark.single_torch_thread


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """The adapters are never fetched here: the fresh-adapter path is what runs."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_reachable.cache_clear()
    yield
    hub_reachable.cache_clear()


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("specter2")
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


def config_for(bert, **overrides) -> dict:
    """Null adapters: fresh ones, as params ask for them offline."""
    return {"base_model": str(bert), "query_adapter": None, "document_adapter": None, "max_seq_length": 64,
            "encode_batch_size": 16, **overrides}


def test_a_named_adapter_that_cannot_load_is_an_error(fixture):
    _, bert = fixture
    with pytest.raises(specter2.AdapterNotLoaded, match=r"query adapter 'allenai/specter2_adhoc_query'.*to null"):
        specter2.load(None, config_for(bert, query_adapter=specter2.DEFAULT_QUERY_ADAPTER))


def test_null_adapters_are_fresh_seeded_and_recorded(fixture):
    from retrieval.identity import loaded_with_identity

    _, bert = fixture
    encoder, identity = loaded_with_identity(lambda: specter2.load(None, config_for(bert)))
    assert encoder.info["pretrained_adapters"] == {"query": False, "document": False}
    assert [(m["source"], m.get("sha256")) for m in identity["models"]] == [
        ("local", identity["models"][0]["sha256"]), ("fresh", "seq_bn:seed1"), ("fresh", "seq_bn:seed2")]
    # The same fresh adapters every time: a baseline index and its later search must use one model.
    again = specter2.load(str(bert), config_for(bert))
    text = ["heart heartmarker1 cardiac artery"]
    np.testing.assert_array_equal(encoder.encode_queries(text), again.encode_queries(text))
    # The two adapters are different paths through the shared body.
    assert not np.allclose(encoder.encode_queries(text), encoder.encode(text, "document"), atol=1e-4)


def test_adapters_only_training_resumes_and_keeps_the_body(fixture, tmp_path):
    dataset, bert = fixture
    config = config_for(bert, loss="triplet", train_body=False, learning_rate=1e-2)
    data = training_data(dataset)
    # selection "trained": this test is about what adapter training changes, whatever validation says of it
    settings = TrainSettings(epochs=2, batch_size=8, learning_rate=2e-5, negatives_per_query=2, seed=0,
                             selection="trained")
    fresh = specter2.load(None, config)
    text = ["heart heartmarker1 cardiac artery"]

    with pytest.raises(Crash):
        specter2.train(config, data, tmp_path / "model", settings, checkpoint_dir=tmp_path / "checkpoints",
                       callbacks=[StopAfterFirstSave()])
    assert not (tmp_path / "model").exists()
    checkpoint = next((tmp_path / "checkpoints").glob("checkpoint-*"))
    assert (checkpoint / "model.safetensors").stat().st_size < 100_000  # adapters only, not the body
    summary = specter2.train(config, data, tmp_path / "model", settings, checkpoint_dir=tmp_path / "checkpoints")
    assert summary["resumed"] and summary["steps"] == 2 * math.ceil(36 / 8) and summary["train_body"] == 0
    assert summary["trainable_parameters"] < sum(p.numel() for p in fresh.model.parameters()) / 10
    assert summary["kept"].startswith("epoch") and len(summary["val_ndcg_at_10_epochs"]) == 2

    saved = tmp_path / "model"
    assert {p.name for p in (saved / "adapters").iterdir()} == {"query", "document"}
    trained = specter2.load(str(saved), {})
    assert trained.similarity == "l2" and set(trained.model.adapters_config.adapters) == set(specter2.ADAPTER_NAMES.values())
    original = BertModel.from_pretrained(bert).state_dict()
    body = {k.removeprefix("bert."): v for k, v in trained.model.state_dict().items() if k.startswith("bert.")}
    for name, value in original.items():
        assert torch.equal(body[name], value), name
    adapter_names = trained.adapter_parameter_names()
    fresh_state, trained_state = fresh.model.state_dict(), trained.model.state_dict()
    assert any(not torch.equal(fresh_state[n], trained_state[n]) for n in adapter_names)
    assert not np.allclose(fresh.encode_queries(text), trained.encode_queries(text))
    assert not np.allclose(trained.encode_queries(text), trained.encode(text, "document"), atol=1e-4)
    # the adapters saved on their own load onto the (unchanged) base and give the trained model back
    portable = specter2.load(str(bert), config_for(bert, query_adapter=str(saved / "adapters" / "query"),
                                                   document_adapter=str(saved / "adapters" / "document")))
    assert portable.info["pretrained_adapters"] == {"query": True, "document": True}
    np.testing.assert_allclose(portable.encode_queries(text), trained.encode_queries(text), atol=1e-6)
    np.testing.assert_allclose(portable.encode(text, "document"), trained.encode(text, "document"), atol=1e-6)


def test_train_save_reload_index_search(fixture, tmp_path):
    dataset, bert = fixture
    config = config_for(bert, loss="mnrl", train_body=True)
    settings = TrainSettings(epochs=12, batch_size=8, learning_rate=3e-3, negatives_per_query=1, seed=0)
    queries = {q: dataset.queries[q]["text"] for q in dataset.queries}
    pairs = [(queries[q], dataset.corpus[d]) for q, docs in dataset.qrels["train"].items() for d in docs]

    def pair_distances(encoder) -> np.ndarray:
        q = encoder.encode_queries([p[0] for p in pairs])
        d = encoder.encode_documents([p[1] for p in pairs])
        return np.linalg.norm(q - d, axis=1)

    before = pair_distances(specter2.load(None, config))
    summary = specter2.train(config, training_data(dataset), tmp_path / "model", settings,
                             checkpoint_dir=tmp_path / "checkpoints")
    assert summary["train_examples"] == 36 and math.isfinite(summary["train_loss"]) and summary["train_body"] == 1
    encoder = specter2.load(str(tmp_path / "model"), config)
    assert not np.allclose(before, pair_distances(encoder))

    stats = specter2.build_index(str(tmp_path / "model"), dataset.corpus, tmp_path / "index", config)
    assert stats["num_docs"] == len(dataset.corpus) and stats["dim"] == 32
    info = json.loads((tmp_path / "index" / "index.json").read_text())
    assert info["similarity"] == "l2" and info["encoder"] == str(tmp_path / "model") and info["dim"] == 32
    results = specter2.search(tmp_path / "index", queries, 5, config)
    assert set(results) == set(queries)
    for hits in results.values():
        assert len(hits) == 5 and [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    # scores are exact negative Euclidean distances
    doc_ids = list(dataset.corpus)
    docs = encoder.encode_documents([dataset.corpus[d] for d in doc_ids])
    query = encoder.encode_queries([queries["q1"]])[0]
    exact = dict(zip(doc_ids, -np.linalg.norm(docs - query, axis=1)))
    for doc_id, score in results["q1"]:
        assert score == pytest.approx(exact[doc_id], abs=1e-3)
    assert [d for d, _ in results["q1"]] == sorted(exact, key=exact.get, reverse=True)[:5]
    # the query naming heart1's marker word finds it, as do most training queries
    assert "heart1" in [d for d, _ in results["q1"]], results["q1"]
    train_hits = [any(d in docs for d, _ in results[q]) for q, docs in dataset.qrels["train"].items()]
    assert sum(train_hits) >= 0.8 * len(train_hits)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_euclidean_index_finds_nearest_documents(kind, tmp_path):
    from retrieval.dense_index import FaissSearcher, save_dense_index

    rng = np.random.default_rng(0)
    docs = rng.normal(size=(400, 24)).astype(np.float32) * rng.uniform(0.5, 3, size=(400, 1)).astype(np.float32)
    queries = rng.normal(size=(5, 24)).astype(np.float32)
    index = specter2.build_l2_index(docs, kind, ivf_nlist=4, pq_m=8)
    save_dense_index(index, [f"d{i}" for i in range(len(docs))], tmp_path / "index", {"similarity": "l2"})
    hits = FaissSearcher(tmp_path / "index", ivf_nprobe=4).batch_search(queries, [f"q{i}" for i in range(5)], 10)
    exact = np.linalg.norm(docs[None, :, :] - queries[:, None, :], axis=2)
    for i in range(len(queries)):
        nearest = [f"d{j}" for j in np.argsort(exact[i])[:10]]
        found = [doc for doc, _ in hits[f"q{i}"]]
        if kind == "ivfpq":  # product quantisation is approximate: most of the true top 10
            assert len(set(found) & set(nearest)) >= 5
            continue
        assert found == nearest
        np.testing.assert_allclose([d for _, d in hits[f"q{i}"]], exact[i][np.argsort(exact[i])[:10]] ** 2, rtol=1e-4)
