"""Encoding backends (retrieval/backends.py) on the tiny 2-layer BERT: exported ONNX/OpenVINO encoders agree with
PyTorch, exports are cached, and bad choices are refused."""

from __future__ import annotations

import os

import numpy as np
import pytest

from retrieval.backends import (activation_matmuls, backend_record, check_choice, cpu_flags, encode_batch_size,
                                export_folder, export_variant, int8_config_name, load_sentence_transformer)
from retrieval.identity import file_sha256, weights_digest
from tiny import corpus_texts, write_tiny_bert, write_tiny_dataset



@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("backends")
    texts = corpus_texts(write_tiny_dataset(root / "data"))
    return {"model": str(write_tiny_bert(root / "model", texts)), "texts": texts, "cache": root / "exports"}


@pytest.fixture(scope="module")
def torch_vectors(tiny):
    return load_sentence_transformer(tiny["model"]).encode(tiny["texts"], normalize_embeddings=True)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1)  # rows are normalised: the dot product is the cosine


def test_onnx_fp32_gives_the_torch_embeddings(tiny, torch_vectors):
    model = load_sentence_transformer(tiny["model"], backend="onnx", cache_dir=tiny["cache"], threads=1)
    vectors = model.encode(tiny["texts"], normalize_embeddings=True)
    assert vectors.shape == torch_vectors.shape
    assert cosines(vectors, torch_vectors).min() > 0.9999  # same graph in fp32: rounding differences only
    record = backend_record(model)
    assert (record["backend"], record["quantize"], record["variant"], record["file"], record["threads"]) == \
        ("onnx", "none", "fp32", "onnx/model.onnx", 1)
    assert record["sha256"] == file_sha256(os.path.join(record["export_dir"], "onnx", "model.onnx"))


def test_onnx_int8_quantises_the_weight_matmuls_and_stays_close(tiny, torch_vectors):
    import onnx

    model = load_sentence_transformer(tiny["model"], backend="onnx", quantize="int8", cache_dir=tiny["cache"])
    record = backend_record(model)
    config = int8_config_name(cpu_flags())
    assert record["variant"] == f"int8-{config}" and config in record["file"]
    graph = onnx.load(os.path.join(record["export_dir"], record["file"])).graph
    ops = [node.op_type for node in graph.node]
    # 2 layers x 6 Linear layers (query, key, value, attention output, intermediate, output) become MatMulInteger;
    # the 2 x 2 attention products of two activations (query x key, weights x value) stay float MatMuls.
    assert ops.count("MatMulInteger") == 12 and ops.count("MatMul") == 4
    vectors = model.encode(tiny["texts"], normalize_embeddings=True)
    # Stated bound for dynamic int8 (measured on this model: min cosine above 0.9999; all-MiniLM-L6-v2 on SciFact
    # abstracts: 0.992).
    assert cosines(vectors, torch_vectors).min() > 0.99


def test_an_int8_vector_does_not_depend_on_the_texts_encoded_with_it(tiny):
    from retrieval.models.dense import encode

    model = load_sentence_transformer(tiny["model"], backend="onnx", quantize="int8", cache_dir=tiny["cache"])
    texts = tiny["texts"][:12]
    # One long text among short ones: in a batch it widens the padding and the activation range of the others.
    outlier = " ".join(tiny["texts"]) + " 9999 XXXX"
    assert encode_batch_size(model, 32) == 1
    alone = np.stack([encode(model, [text], batch_size=32, progress=False)[0] for text in texts])
    together = encode(model, [outlier, *texts], batch_size=32, progress=False)[1:]
    assert np.array_equal(alone, together)
    # What batching does to them (why int8 encodes one text per call): one scale for the whole batch.
    batched = model.encode([outlier, *texts], batch_size=32, normalize_embeddings=True)[1:]
    assert not np.array_equal(alone, batched)


def test_encoders_whose_vectors_do_not_move_with_the_batch_keep_their_batch_size(tiny):
    # fp32, and OpenVINO int8 (weights compressed, activations not quantised): batched vectors equal lone ones.
    texts = tiny["texts"][:6]
    for backend, quantize in (("torch", "none"), ("onnx", "none"), ("openvino", "int8")):
        model = load_sentence_transformer(tiny["model"], backend=backend, quantize=quantize, cache_dir=tiny["cache"])
        assert encode_batch_size(model, 32) == 32
        alone = np.stack([model.encode([text], normalize_embeddings=True)[0] for text in texts])
        batched = model.encode([" ".join(tiny["texts"]), *texts], batch_size=32, normalize_embeddings=True)[1:]
        assert np.abs(alone - batched).max() < 1e-6


def test_activation_matmuls_are_those_without_a_constant_input():
    from onnx import TensorProto, helper

    weight = helper.make_tensor("W", TensorProto.FLOAT, [2, 2], [1.0, 0.0, 0.0, 1.0])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="dense"),
         helper.make_node("MatMul", ["h", "hT"], ["s"], name="scores"),
         helper.make_node("Transpose", ["h"], ["hT"], name="transpose")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, 2])], initializer=[weight])
    # dense multiplies by the initializer W; scores multiplies two computed tensors; Transpose is no MatMul.
    assert activation_matmuls(graph) == ["scores"]


def test_openvino_fp32_and_int8_stay_close_to_torch(tiny, torch_vectors):
    for quantize, bound in (("none", 0.9999), ("int8", 0.99)):
        model = load_sentence_transformer(tiny["model"], backend="openvino", quantize=quantize,
                                          cache_dir=tiny["cache"], threads=1)
        assert cosines(model.encode(tiny["texts"], normalize_embeddings=True), torch_vectors).min() > bound
        record = backend_record(model)
        assert record["ov_config"] == {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": "1"}
        assert record["variant"] == ("fp32" if quantize == "none" else "int8-weights")


def test_the_export_is_made_once_and_reused(tiny):
    first = export_folder(tiny["model"], backend="onnx", cache_dir=tiny["cache"])
    assert first.name == f"onnx-fp32-{weights_digest(tiny['model'])[:16]}"
    stamps = {path: path.stat().st_mtime_ns for path in first.rglob("*")}
    model = load_sentence_transformer(tiny["model"], backend="onnx", cache_dir=tiny["cache"])
    assert backend_record(model)["export_dir"] == str(first)
    assert {path: path.stat().st_mtime_ns for path in first.rglob("*")} == stamps  # nothing rewritten


def test_an_incomplete_export_folder_is_exported_again(tmp_path, tiny):
    target = tmp_path / f"onnx-fp32-{weights_digest(tiny['model'])[:16]}"
    (target / "onnx").mkdir(parents=True)
    (target / "onnx" / "model.onnx").write_bytes(b"truncated")  # a folder no atomic export would leave
    folder = export_folder(tiny["model"], backend="onnx", cache_dir=tmp_path)
    assert folder == target and (folder / "export.json").is_file()
    assert (folder / "onnx" / "model.onnx").stat().st_size > 1000


def test_torch_is_recorded_and_a_foreign_model_is_not(tiny):
    from sentence_transformers import SentenceTransformer

    assert backend_record(load_sentence_transformer(tiny["model"])) == \
        {"backend": "torch", "quantize": "none", "variant": "fp32", "file": None, "sha256": None}
    with pytest.raises(ValueError, match="not loaded with retrieval.backends.load_sentence_transformer"):
        backend_record(SentenceTransformer(tiny["model"]))


def test_unknown_choices_are_refused(tiny):
    with pytest.raises(ValueError, match=r"^unknown encoding backend 'tensorrt': use one of torch, onnx, openvino$"):
        load_sentence_transformer(tiny["model"], backend="tensorrt")
    with pytest.raises(ValueError, match=r"^unknown quantisation 'int4': use one of none, int8$"):
        load_sentence_transformer(tiny["model"], backend="onnx", quantize="int4")
    with pytest.raises(ValueError, match="quantisation 'int8' needs an exported backend"):
        check_choice("torch", "int8")
    with pytest.raises(ValueError, match="threads must be a positive number"):
        load_sentence_transformer(tiny["model"], backend="onnx", threads=0)
    with pytest.raises(ValueError, match="no weight files"):
        export_folder(str(os.path.dirname(__file__)), backend="onnx")


def test_int8_configuration_follows_the_cpu_flags():
    assert int8_config_name({"avx2", "avx512f", "avx512_vnni"}, "x86_64") == "avx512_vnni"
    assert int8_config_name({"avx2", "avx_vnni"}, "x86_64") == "avx512_vnni"  # 256-bit VNNI: u8 x s8 natively too
    # AVX512 without VNNI would saturate u8 x s8 products: u8 weights as on AVX2.
    assert int8_config_name({"avx2", "avx512f"}, "x86_64") == "avx2"
    assert int8_config_name({"neon"}, "aarch64") == "arm64"
    with pytest.raises(ValueError, match="int8 quantisation needs AVX2, VNNI or an ARM64 CPU"):
        int8_config_name({"sse4_2", "avx"}, "x86_64")
    assert export_variant("onnx", "int8", {"avx2"}) == "int8-avx2"
    assert export_variant("openvino", "int8", {"avx2"}) == "int8-weights"
    assert export_variant("onnx", "none", set()) == "fp32"


def test_cpu_flags_are_read_from_the_flags_lines_only():
    cpuinfo = "model name\t: avx512_vnni emulator\nflags\t\t: fpu avx2 avx512_vnni\nflags\t\t: fpu avx2 avx512_vnni\n"
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_vnni"}
    assert cpu_flags("") == set()
