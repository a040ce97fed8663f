"""Encoding settings (retrieval/encoding.py), the embedding cache, and the dense family on an ONNX int8 export: the
index records the export, queries are encoded by the same one, and validation during training encodes the corpus
through the export the index stage then reuses (no second encoding)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from retrieval.dataset import load_beir
from retrieval.embedding_cache import cached_embeddings, entry_key
from retrieval.encoding import Encoding, encoding_from_params, index_encoding, using_encoding
from retrieval.identity import ModelMismatch
from retrieval.metrics import per_query
from retrieval.models import dense
from retrieval.models.base import TrainingData, TrainSettings
from tiny import corpus_texts, write_tiny_bert, write_tiny_dataset


@pytest.fixture(autouse=True)
def isolated_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RETRIEVAL_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)


def test_auto_is_onnx_int8_on_a_cpu_and_torch_on_cuda_or_for_a_family_without_exports():
    assert encoding_from_params({}, exportable=True, cuda=False) == Encoding("onnx", "int8", "fp32")
    on_gpu = encoding_from_params({"precision": "bf16"}, exportable=True, cuda=True)
    assert (on_gpu.backend, on_gpu.quantize, on_gpu.precision) == ("torch", "none", "bf16")
    assert encoding_from_params({"precision": "fp32"}, exportable=False, cuda=False) == Encoding("torch", "none", "fp32")
    # an export runs in its own precision: torch autocast stays off
    assert encoding_from_params({"backend": "openvino", "quantize": "none", "precision": "bf16"}, exportable=True,
                                cuda=False) == Encoding("openvino", "none", "fp32")


def test_colbert_encodes_in_fp32_unless_bf16_is_asked_for(monkeypatch):
    import retrieval.precision
    from stages.encoding import encoding_for

    # Pretend the CPU has native bf16, so that `auto` would pick it for any other torch family.
    monkeypatch.setattr(retrieval.precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    auto = {"encode": {"backend": "auto", "quantize": "auto", "precision": "auto"}}
    assert encoding_for(auto, "splade").precision == "bf16"
    assert encoding_for(auto, "colbert").precision == "fp32"
    assert encoding_for({"encode": {"precision": "bf16"}}, "colbert").precision == "bf16"
    assert encoding_for(auto, "dense").precision == "fp32"  # the int8 export runs in its own precision


@pytest.mark.parametrize("settings, message", [
    ({"backend": "tensorrt"}, r"encode.backend: unknown value 'tensorrt'; use one of auto, torch, onnx, openvino"),
    ({"quantize": "int4"}, r"encode.quantize: unknown value 'int4'"),
    ({"precison": "bf16"}, r"unknown encode.precison: the encoding settings are precision, backend, quantize"),
    ({"backend": "torch", "quantize": "int8"}, r"int8 needs an exported backend"),
])
def test_bad_settings_are_errors_naming_the_key(settings, message):
    with pytest.raises(ValueError, match=message):
        encoding_from_params(settings, exportable=True, cuda=False)


def test_an_export_asked_for_a_family_that_has_none_is_an_error():
    with pytest.raises(ValueError, match=r"encode.backend onnx: this model family encodes with torch only"):
        encoding_from_params({"backend": "onnx"}, exportable=False, cuda=False)


def test_the_cache_computes_once_per_encoder_and_texts(tmp_path):
    calls = []

    def compute(texts):
        calls.append(list(texts))
        return np.arange(len(texts) * 2, dtype=np.float32).reshape(len(texts), 2)

    encoder = {"sha256": "a" * 64, "max_seq_length": 32}
    first = cached_embeddings(encoder, ["x", "y"], compute, cache_dir=tmp_path)
    again = cached_embeddings(encoder, ["x", "y"], compute, cache_dir=tmp_path)
    assert calls == [["x", "y"]] and np.array_equal(first, again)
    cached_embeddings({**encoder, "max_seq_length": 64}, ["x", "y"], compute, cache_dir=tmp_path)
    cached_embeddings(encoder, ["y", "x"], compute, cache_dir=tmp_path)  # order is part of the key
    cached_embeddings(None, ["x", "y"], compute, cache_dir=tmp_path)  # not cacheable: always computed
    assert len(calls) == 4 and len(list(tmp_path.glob("*.npy"))) == 3
    assert entry_key(encoder, ["x", "y"]) != entry_key(encoder, ["xy"])  # texts are hashed one by one


@pytest.fixture()
def tiny(tmp_path):
    data_dir = write_tiny_dataset(tmp_path / "data")
    dataset = load_beir(data_dir)
    return {"dataset": dataset, "model": write_tiny_bert(tmp_path / "model", corpus_texts(data_dir)),
            "config": {"max_seq_length": 64, "encode_batch_size": 16}}


ONNX_INT8 = Encoding("onnx", "int8", "fp32")


def embedding_entries(tmp_path) -> int:
    return len(list((tmp_path / "cache" / "embeddings").glob("*.npy")))


def test_an_int8_index_records_its_export_and_queries_are_encoded_by_it(tiny, tmp_path):
    dataset, config = tiny["dataset"], {**tiny["config"], "base_model": str(tiny["model"])}
    queries = {q: dataset.queries[q]["text"] for q in list(dataset.queries)[:6]}
    index = tmp_path / "index"
    with using_encoding(ONNX_INT8):
        dense.build_index(str(tiny["model"]), dataset.corpus, index, config)
    info = json.loads((index / "index.json").read_text())
    backend = info["encoder_identity"]["backend"]
    assert (backend["backend"], backend["quantize"]) == ("onnx", "int8") and backend["variant"].startswith("int8-")
    assert backend["file"].startswith("onnx/model_qint8_") and len(backend["sha256"]) == 64
    assert index_encoding(info) == ONNX_INT8
    assert embedding_entries(tmp_path) == 1
    hits = dense.search(index, queries, 5, config)  # outside the block: the index says how to encode
    # the int8 query vectors against the int8 document vectors, recomputed here by hand (in the same batches: int8
    # activations are quantised with a scale per batch, so another batching gives slightly other vectors)
    exported = dense.load_encoder(str(tiny["model"]), config, ONNX_INT8)
    q = dense.encode(exported, list(queries.values()), batch_size=16, progress=False)
    d = dense.encode(exported, [dense.doc_text(dataset.corpus[doc]) for doc in dataset.corpus], batch_size=16,
                     progress=False)
    best = np.argsort(-(q @ d.T), axis=1)[:, 0]
    assert [hits[qid][0][0] for qid in queries] == [list(dataset.corpus)[j] for j in best]
    # building again encodes nothing: the cached document vectors are reused
    with using_encoding(ONNX_INT8):
        dense.build_index(str(tiny["model"]), dataset.corpus, tmp_path / "again", config)
    assert embedding_entries(tmp_path) == 1
    np.testing.assert_array_equal(np.load(next((tmp_path / "cache" / "embeddings").glob("*.npy"))), d)


def test_an_index_is_not_searched_with_another_export(tiny, tmp_path):
    dataset, config = tiny["dataset"], tiny["config"]
    index = tmp_path / "index"
    with using_encoding(ONNX_INT8):
        dense.build_index(str(tiny["model"]), dataset.corpus, index, config)
    info_path = index / "index.json"
    info = json.loads(info_path.read_text())
    info["encoder_identity"]["backend"]["variant"] = "int8-avx2"  # as if built on a CPU without VNNI
    info_path.write_text(json.dumps(info))
    with pytest.raises(ModelMismatch, match=r"was encoded with \[onnx int8 int8-avx2 .*\] but queries would be "
                                            r"encoded with \[onnx int8 int8-"):
        dense.search(index, {"q": "some words"}, 5, config)


def tiny_training_data(dataset, encoding: Encoding | None = None) -> TrainingData:
    """Every (training query, judged document) as a row without hard negatives; 8 of the queries validate."""
    train_qrels = dataset.qrels["train"]
    examples = [{"query": dataset.queries[q]["text"], "positive": dataset.corpus[d], "negatives": []}
                for q, docs in train_qrels.items() for d in docs]
    val = list(train_qrels)[:8]
    return TrainingData(examples, val_queries={q: dataset.queries[q]["text"] for q in val}, val_corpus=dataset.corpus,
                        val_qrels={q: train_qrels[q] for q in val}, encoding=encoding)


def test_validation_encodes_through_the_export_the_finetuned_index_reuses(tiny, tmp_path):
    dataset, config = tiny["dataset"], {**tiny["config"], "base_model": str(tiny["model"])}
    data = tiny_training_data(dataset, encoding=ONNX_INT8)
    settings = TrainSettings(epochs=2, batch_size=8, learning_rate=5e-3, warmup_ratio=0.0, negatives_per_query=0,
                             selection="trained")
    summary = dense.train(config, data, tmp_path / "out", settings, checkpoint_dir=tmp_path / "ckpt")
    assert summary["kept"] in ("epoch 1", "epoch 2")
    # base + two epochs: three corpus encodings, each through its own export
    assert embedding_entries(tmp_path) == 3
    index = tmp_path / "index"
    with using_encoding(ONNX_INT8):
        dense.build_index(str(tmp_path / "out"), dataset.corpus, index, config)
    assert embedding_entries(tmp_path) == 3  # the kept epoch's corpus vectors were reused, not encoded again
    # and they are the vectors validation scored: searching the index reproduces the kept epoch's validation score
    hits = dense.search(index, data.val_queries, 100, config)
    run = {q: dict(doc_hits) for q, doc_hits in hits.items()}
    ndcg = per_query(data.val_qrels, run, "ndcg_at_10")
    kept_epoch = int(summary["kept"].split()[-1])
    assert sum(ndcg.values()) / len(ndcg) == pytest.approx(summary["val_ndcg_at_10_epochs"][kept_epoch - 1], abs=1e-9)


def test_training_precision_becomes_cpu_autocast_arguments_only_for_bf16():
    from retrieval.precision import trainer_precision_args

    assert trainer_precision_args("fp32") == {}
    expected = {"bf16": True} if torch.cuda.is_available() else {"bf16": True, "use_cpu": True}
    assert trainer_precision_args("bf16") == expected


def test_a_bf16_training_run_trains_and_keeps_fp32_weights(tiny, tmp_path, monkeypatch):
    config = {**tiny["config"], "base_model": str(tiny["model"])}
    data = tiny_training_data(tiny["dataset"])
    examples = data.examples
    settings = TrainSettings(epochs=1, batch_size=8, learning_rate=5e-3, warmup_ratio=0.0, negatives_per_query=0,
                             selection="trained", precision="bf16")
    # TrainingArguments(bf16=True) sets ACCELERATE_MIXED_PRECISION=bf16 in the process environment, which every
    # later Trainer in the process would inherit (a stage trains once per process; tests share one)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    summary = dense.train(config, data, tmp_path / "out", settings, checkpoint_dir=tmp_path / "ckpt")
    assert summary["steps"] == -(-len(examples) // 8) and summary["kept"] == "epoch 1"
    trained, base = dense.load(str(tmp_path / "out")), dense.load(str(tiny["model"]))
    weights = dict(trained.named_parameters())
    assert all(p.dtype == torch.float32 for p in weights.values())
    assert any(not torch.equal(p, weights[name]) for name, p in base.named_parameters())
