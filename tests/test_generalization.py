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
