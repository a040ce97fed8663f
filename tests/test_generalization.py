"""mteb 2.x on a local BEIR collection (retrieval/generalization.py): its scores agree with our own pipeline (index,
search, retrieval.metrics) for the same model — torch, an ONNX export, and a two-tower Router model whose queries
and documents go through different towers — and it writes fresh result files, never reusing old ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from retrieval.dataset import load_beir
from retrieval.encoding import Encoding, using_encoding
from retrieval.generalization import MTEB_SCORES, evaluate_model, local_retrieval_task
from retrieval.metrics import evaluate
from retrieval.models import dense, dpr
from tiny import corpus_texts, write_tiny_bert, write_tiny_dataset

CONFIG = {"max_seq_length": 64, "encode_batch_size": 16}
BATCH = 16  # the pipeline's batch size too: a batch's padding moves vectors by float rounding


@pytest.fixture(autouse=True)
def offline_one_thread(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RETRIEVAL_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("generalization")
    data_dir = write_tiny_dataset(root / "data")
    return {"folder": data_dir, "dataset": load_beir(data_dir), "model": write_tiny_bert(root / "model",
                                                                                       corpus_texts(data_dir))}


def as_run(hits: dict) -> dict:
    return {qid: dict(pairs) for qid, pairs in hits.items()}


def assert_agree(ours: dict, theirs: dict) -> None:
    # mteb rounds its pytrec_eval means to 5 decimals (not MRR), so they can differ from ours by 5e-6
    for metric in MTEB_SCORES:
        assert theirs[metric] == pytest.approx(ours[metric], abs=1e-4), metric


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_mteb_agrees_with_our_dense_index_and_metrics(tiny, tmp_path, backend):
    dataset, model_ref = tiny["dataset"], str(tiny["model"])
    qrels = dataset.qrels["test"]
    encoding = Encoding(backend, "none", "fp32")
    with using_encoding(encoding):
        dense.build_index(model_ref, dataset.corpus, tmp_path / "index", CONFIG)
    hits = dense.search(tmp_path / "index", {q: dataset.queries[q]["text"] for q in qrels}, len(dataset.corpus), CONFIG)
    ours = evaluate(qrels, as_run(hits), list(MTEB_SCORES))

    model = dense.load_encoder(model_ref, CONFIG, encoding)  # the same encoder the index was built with
    task = local_retrieval_task(dataset, split="test", name="LocalTiny", folder=tiny["folder"])
    scores = evaluate_model(model, task, output_folder=tmp_path / "mteb", batch_size=BATCH, model_name="tiny/bert")
    assert list(scores) == ["LocalTiny"]
    assert_agree(ours, scores["LocalTiny"])
    assert 0 < ours["ndcg_at_10"] < 1  # a random tiny BERT ranks imperfectly: the agreement is not trivial

    result_dir = tmp_path / "mteb" / "results" / "tiny__bert"
    (result_file,) = result_dir.glob("*/LocalTiny.json")
    written = json.loads(result_file.read_text())
    assert written["task_name"] == "LocalTiny" and written["dataset_revision"] == task.metadata.revision
    assert written["scores"]["test"][0]["ndcg_at_10"] == scores["LocalTiny"]["ndcg_at_10"]
    assert (result_file.parent / "model_meta.json").is_file()


def test_a_router_model_encodes_queries_and_documents_with_their_own_towers(tiny, tmp_path):
    """As our DPR family builds it: mteb must call encode_query / encode_document, like dpr.search / build_index."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Router, Transformer

    bert = str(tiny["model"].parent / "bert")
    towers = {name: [Transformer(bert, max_seq_length=64), Pooling(32, pooling)]
              for name, pooling in (("query", "cls"), ("document", "mean"))}
    router = Router.for_query_document(query_modules=towers["query"], document_modules=towers["document"])
    SentenceTransformer(modules=[router], similarity_fn_name="dot").save(str(tmp_path / "two-tower"))
    model = dpr.load(str(tmp_path / "two-tower"), CONFIG)
    text = ["heart heartmarker1 cardiac"]
    assert not np.allclose(model.encode_query(text), model.encode_document(text))  # the towers do differ

    dataset = tiny["dataset"]
    qrels = dataset.qrels["test"]
    dpr.build_index(str(tmp_path / "two-tower"), dataset.corpus, tmp_path / "index", CONFIG)
    hits = dpr.search(tmp_path / "index", {q: dataset.queries[q]["text"] for q in qrels}, len(dataset.corpus), CONFIG)
    ours = evaluate(qrels, as_run(hits), list(MTEB_SCORES))
    task = local_retrieval_task(dataset, split="test", name="LocalTinyTwoTower", folder=tiny["folder"])
    scores = evaluate_model(model, task, output_folder=tmp_path / "mteb", batch_size=BATCH)
    assert_agree(ours, scores["LocalTinyTwoTower"])


def test_a_changed_model_is_scored_afresh_not_read_from_old_results(tiny, tmp_path):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny["model"]), device="cpu")
    task = local_retrieval_task(tiny["dataset"], split="test", name="LocalTiny", folder=tiny["folder"])
    first = evaluate_model(model, task, output_folder=tmp_path / "mteb", batch_size=BATCH)["LocalTiny"]
    with torch.no_grad():  # same model object and name, other weights: the results path is the same
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    second = evaluate_model(model, task, output_folder=tmp_path / "mteb", batch_size=BATCH)["LocalTiny"]
    assert second != first
    (result_file,) = (tmp_path / "mteb" / "results").rglob("LocalTiny.json")
    assert json.loads(result_file.read_text())["scores"]["test"][0]["ndcg_at_10"] == second["ndcg_at_10"]


def test_only_judged_queries_are_asked_and_given_qrels_replace_the_split(tiny):
    dataset = tiny["dataset"]
    task = local_retrieval_task(dataset, split="test", name="LocalTiny")
    task.load_data()
    split = task.dataset["default"]["test"]
    assert sorted(split["queries"]["id"]) == sorted(dataset.qrels["test"]) and len(dataset.queries) == 48
    assert len(split["corpus"]) == len(dataset.corpus)
    own = {q: dataset.qrels["train"][q] for q in list(dataset.qrels["train"])[:5]}
    task = local_retrieval_task(dataset, split="test", name="LocalTinyOwn", qrels={**own, "q4": {}})
    task.load_data()
    assert task.dataset["default"]["test"]["queries"]["id"] == sorted(own, key=list(dataset.queries).index)
    assert task.dataset["default"]["test"]["relevant_docs"] == own


def test_an_empty_split_is_an_error_naming_the_split_and_the_folder(tiny):
    dataset, folder = tiny["dataset"], tiny["folder"]
    with pytest.raises(ValueError, match=rf"split 'dev' of {folder}: no qrels \(splits with qrels: test, train\)"):
        local_retrieval_task(dataset, split="dev", name="LocalTiny", folder=folder)
    with pytest.raises(ValueError, match=rf"split 'test' of {folder}: no queries with relevance judgements"):
        local_retrieval_task(dataset, split="test", name="LocalTiny", folder=folder, qrels={"q0": {}})
    with pytest.raises(ValueError, match=r"unknown query ids \['nope'\]"):
        local_retrieval_task(dataset, split="test", name="LocalTiny", folder=folder, qrels={"nope": {"heart0": 1}})
    with pytest.raises(ValueError, match=r"'SciFact' is one of mteb's own tasks"):
        local_retrieval_task(dataset, split="test", name="SciFact")


# --- the generalize stage's building blocks: settings, exact search, scoring several systems, mteb task data ---

from retrieval.generalization import (Collection, GeneralizeSettings, compare_systems_on, dataset_from_mteb_task,
                                      _embedder_wrapper_class, exact_search, inner_products, score_collection)

ONNX_INT8 = Encoding("onnx", "int8", "fp32")


def test_settings_read_names_folders_and_mteb_tasks_and_reject_what_they_do_not_know():
    settings = GeneralizeSettings.from_params({"datasets": ["cisi", {"name": "mine", "source": "dir", "path": "/d",
                                                                     "split": "dev"},
                                                            {"name": "NFCorpus", "source": "mteb"}],
                                               "split": "test", "tolerance": 1e-3})
    assert settings.datasets == (Collection("cisi"), Collection("mine", "dir", "/d", "dev"),
                                 Collection("NFCorpus", "mteb", None, "test"))
    assert settings.tolerance == 1e-3 and GeneralizeSettings.from_params(None).datasets == ()
    bad = [
        ({"colour": 1}, r"generalize\.colour: unknown key"),
        ({"datasets": ["cisi", {"name": "x", "pth": "/d"}]}, r"generalize\.datasets\[1\]\.pth: unknown key"),
        ({"datasets": [{"name": "x", "source": "dir"}]}, r"generalize\.datasets\[0\]\.path: give a folder"),
        ({"datasets": [{"name": "x", "path": "/d"}]}, r"generalize\.datasets\[0\]\.path: give a folder"),
        ({"datasets": [{"name": "x", "source": "ftp"}]}, r"generalize\.datasets\[0\]\.source: 'ftp' is not one of"),
        ({"datasets": [{"name": "../x"}]}, r"generalize\.datasets\[0\]\.name: '\.\./x' is not a collection name"),
        ({"datasets": ["cisi", "cisi"]}, r"names must be distinct"),
        ({"datasets": "cisi"}, r"generalize\.datasets: a list"),
        ({"tolerance": -1}, r"generalize\.tolerance: a number >= 0"),
    ]
    for section, message in bad:
        with pytest.raises(ValueError, match=message):
            GeneralizeSettings.from_params(section)


def test_exact_search_ranks_by_inner_product_and_keeps_the_top_k():
    docs = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=np.float32)
    queries = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    run = exact_search(queries, ["up", "right"], docs, ["a", "b", "c"], k=2)
    assert run == {"up": {"c": 1.0, "b": pytest.approx(0.8)}, "right": {"a": 1.0, "b": pytest.approx(0.6)}}
    with pytest.raises(ValueError, match="2 query ids for 1 vectors"):
        exact_search(queries[:1], ["up", "right"], docs, ["a", "b", "c"], k=2)


def test_scores_are_the_flat_index_kernel_s_so_near_ties_rank_as_our_index_does():
    """A model whose vectors barely differ (a random BERT's CLS vectors: inner products ~32 apart by ~1e-4) ranks by
    the last bits of each score; mteb's similarity is faiss's flat kernel, so its scores are our index's exactly."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=32).astype(np.float32)
    docs = (base + 1e-5 * rng.normal(size=(50, 32))).astype(np.float32)
    queries = (base + 1e-5 * rng.normal(size=(12, 32))).astype(np.float32)
    matrix = inner_products(queries, docs)
    assert matrix.shape == (12, 50)
    np.testing.assert_allclose(matrix, queries.astype(np.float64) @ docs.astype(np.float64).T, rtol=1e-6)
    run = exact_search(queries, [f"q{i}" for i in range(12)], docs, [f"d{j}" for j in range(50)], k=50)
    assert all(run[f"q{i}"][f"d{j}"] == matrix[i, j] for i in range(12) for j in range(50))  # bit for bit
    similarity = _embedder_wrapper_class().similarity  # what mteb's search calls (it does not use self)
    assert np.array_equal(similarity(None, queries, docs).numpy(), matrix)


@pytest.fixture(scope="module")
def two_systems(tiny, tmp_path_factory):
    """A tiny base model and a perturbed copy of it ("fine-tuned"), each with an ONNX int8 index of the corpus."""
    from sentence_transformers import SentenceTransformer

    root = tmp_path_factory.mktemp("two-systems")
    torch.manual_seed(0)
    other = SentenceTransformer(str(tiny["model"]), device="cpu")
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    other.save(str(root / "other"))
    return {"baseline": str(tiny["model"]), "finetuned": str(root / "other"), "root": root}


def test_scoring_several_systems_agrees_with_mteb_on_int8_vectors_and_compares_them(tiny, two_systems, tmp_path):
    """With dynamically quantised int8 encoders vectors depend on the batch they are encoded in; mteb encodes through
    our embedders in the same batches, so its figures equal ours to its rounding, and documents come from the
    embedding cache the index stage filled."""
    dataset = tiny["dataset"]
    calls = []
    embedders = {}
    with using_encoding(ONNX_INT8):
        for system in ("baseline", "finetuned"):
            dense.build_index(two_systems[system], dataset.corpus, tmp_path / system, CONFIG)
            embedder = dense.embedder(tmp_path / system, CONFIG)

            def documents(docs, embedder=embedder, system=system):
                vectors = embedder.encode_documents(docs)
                calls.append((system, len(docs), vectors))
                return vectors

            embedders[system] = type(embedder)(embedder.model, embedder.encode_queries, documents)
        scores = score_collection(embedders, dataset, split="test", name="LocalTinyTwo", output_folder=tmp_path / "m",
                                  batch_size=CONFIG["encode_batch_size"], depth=100, folder=tiny["folder"])
        hits = dense.search(tmp_path / "finetuned", {q: dataset.queries[q]["text"] for q in dataset.qrels["test"]},
                            100, CONFIG)
    qrels = dataset.qrels["test"]
    assert scores["num_queries"] == len(qrels) and scores["num_docs"] == len(dataset.corpus)
    for system, result in scores["systems"].items():
        assert_agree(result["ours"], result["mteb"])
        assert result["per_query"].keys() == qrels.keys()
    # our exact search over the embedder's vectors is the index's own search
    assert evaluate(qrels, as_run(hits), ["ndcg_at_10"]) == \
        evaluate(qrels, scores["systems"]["finetuned"]["run"], ["ndcg_at_10"])
    # each system's corpus encoded twice (ours, then mteb's), whole and in corpus order: the second is the cached copy
    assert [(system, n) for system, n, _ in calls] == [(s, len(dataset.corpus)) for s in ("baseline",) * 2 +
                                                      ("finetuned",) * 2]
    assert np.array_equal(calls[0][2], calls[1][2]) and np.array_equal(calls[2][2], calls[3][2])

    row = compare_systems_on(scores, samples=2000)
    base, tuned = scores["systems"]["baseline"], scores["systems"]["finetuned"]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    assert row["delta"] == pytest.approx(mean(list(tuned["per_query"].values())) -
                                         mean(list(base["per_query"].values())), abs=2e-5)
    assert row["ci_low"] <= row["delta"] + 2e-5 and row["delta"] - 2e-5 <= row["ci_high"]
    assert 0 < row["p_value"] <= 1 and row["mteb_agrees"] and row["mteb_vs_ours_max_difference"] <= 1e-4
    assert row["baseline"] == base["mteb"]["ndcg_at_10"] and row["finetuned"] == tuned["mteb"]["ndcg_at_10"]
    assert row["baseline"] != row["finetuned"]  # the perturbation changed the ranking: the comparison is not trivial


def test_an_mteb_task_becomes_a_dataset_with_its_judged_queries(tiny):
    dataset = tiny["dataset"]
    task = local_retrieval_task(dataset, split="test", name="LocalTinyRound", folder=tiny["folder"])
    round_trip = dataset_from_mteb_task(task, "test")
    assert round_trip.corpus == {d: {"title": doc.get("title") or "", "text": doc["text"]}
                                 for d, doc in dataset.corpus.items()}
    assert round_trip.queries == {q: {"text": dataset.queries[q]["text"]} for q in dataset.qrels["test"]}
    assert round_trip.qrels == {"test": dataset.qrels["test"]}
    with pytest.raises(ValueError, match=r"mteb task LocalTinyRound: no split 'dev' \(splits: test\)"):
        dataset_from_mteb_task(task, "dev")
