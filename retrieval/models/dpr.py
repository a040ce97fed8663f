"""DPR (Karpukhin et al., 2020): separate question and passage encoders, [CLS] embeddings, dot-product scores.

The model is a sentence-transformers ``SentenceTransformer`` whose single module is a ``Router`` with two towers,
each ``Transformer -> Pooling("cls")`` (plus a linear ``Dense`` when a DPR checkpoint has a projection layer):
``encode_query`` runs the question tower and ``encode_document`` the passage tower; similarity is the plain dot
product (no normalisation). Training is DPR's loss: softmax cross-entropy of the positive passage against the
other in-batch passages and the BM25 hard negatives, i.e. MultipleNegativesRankingLoss with dot-product scores
and scale 1.

Towers come from ``query_model`` / ``passage_model`` (default: Facebook's single-NQ DPR encoders) or, when
``base_model`` is set, both from that one BERT-like model (offline: ``sentence-transformers/all-MiniLM-L6-v2``,
which ``retrieval.hub.resolve_model`` maps to packaged weights).

DPR hub checkpoints are ``DPRQuestionEncoder`` / ``DPRContextEncoder`` models, not ``BertModel``s: their forward
returns only ``pooler_output``, so sentence-transformers' Transformer module (which needs ``last_hidden_state``)
cannot use them as they are. They are converted on load: the encoder's inner ``BertModel`` (``bert_model``) becomes
the tower's transformer, CLS pooling reproduces DPR's ``pooler_output``, and a non-zero ``projection_dim`` becomes
a linear ``Dense`` layer holding ``encode_proj``'s weights.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np

from ..dataset import doc_text
from ..dense_index import FaissSearcher, build_faiss_index, read_index_info, save_dense_index
from ..hub import ModelNotAvailable, resolve_model
from ..identity import index_precision, load_for_index, loaded_with_identity
from ..precision import inference_precision
from .base import Embedder, TrainingData, TrainSettings, is_unset
from .st_training import fit, triplet_columns
from .validation import vector_validator

TRAINABLE = True
DEFAULT_QUERY_MODEL = "facebook/dpr-question_encoder-single-nq-base"
DEFAULT_PASSAGE_MODEL = "facebook/dpr-ctx_encoder-single-nq-base"
DEFAULT_MAX_SEQ_LENGTH = 256
FAISS_BUILD_KEYS = ("hnsw_m", "hnsw_ef_construction", "ivf_nlist", "pq_m")
FAISS_SEARCH_KEYS = ("hnsw_ef_search", "ivf_nprobe")

logger = logging.getLogger(__name__)


def tower_refs(config: Mapping, model_ref: str | None = None) -> tuple[str, str]:
    """(question model, passage model) to initialise the towers from.

    ``model_ref`` is what the index stage passes for the baseline (``str(config["base_model"])``, so ``"None"`` when
    only the DPR pair is configured): unset or equal to a configured model means "the configured towers"; anything
    else is one model for both towers.
    """
    base = config.get("base_model")
    if not is_unset(model_ref) and str(model_ref) not in {str(base), str(config.get("query_model"))}:
        return str(model_ref), str(model_ref)
    if not is_unset(base):
        return str(base), str(base)
    return str(config.get("query_model") or DEFAULT_QUERY_MODEL), str(config.get("passage_model") or DEFAULT_PASSAGE_MODEL)


def _resolve(name: str) -> str:
    try:
        return resolve_model(name)
    except ModelNotAvailable as err:
        raise ModelNotAvailable(f"{err}. For DPR offline, set models.dpr.base_model (e.g. "
                                f"sentence-transformers/all-MiniLM-L6-v2) to initialise both towers from it") from err


def _dpr_tower(path: str, max_seq_length: int) -> list:
    """Convert a DPRQuestionEncoder/DPRContextEncoder checkpoint into Transformer(BERT) + CLS Pooling (+ Dense)."""
    import torch
    from sentence_transformers.sentence_transformer.modules import Dense, Pooling, Transformer
    from transformers import (AutoConfig, BertConfig, BertModel, BertTokenizerFast, DPRContextEncoder,
                              DPRQuestionEncoder)

    config = AutoConfig.from_pretrained(path)
    architecture = (config.architectures or [""])[0]
    if architecture == "DPRContextEncoder":
        encoder = DPRContextEncoder.from_pretrained(path).ctx_encoder
    elif architecture == "DPRQuestionEncoder":
        encoder = DPRQuestionEncoder.from_pretrained(path).question_encoder
    else:
        raise ValueError(f"{path}: a DPR checkpoint of architecture {architecture or '(none)'} is not a DPR "
                         "question or context encoder")
    bert_config = BertConfig(**{k: v for k, v in config.to_dict().items() if k not in ("model_type", "projection_dim",
                                                                                         "architectures")})
    torch.manual_seed(0)  # the (unused) pooler BertModel adds is initialised reproducibly
    bert = BertModel(bert_config)
    missing, unexpected = bert.load_state_dict(encoder.bert_model.state_dict(), strict=False)
    if unexpected or any(not name.startswith("pooler.") for name in missing):
        raise ValueError(f"{path}: DPR encoder weights do not map onto BERT (missing {missing}, unexpected {unexpected})")
    with tempfile.TemporaryDirectory(prefix="dpr-bert-") as tmp:
        bert.save_pretrained(tmp)
        BertTokenizerFast.from_pretrained(path).save_pretrained(tmp)
        transformer = Transformer(tmp, max_seq_length=max_seq_length)
    dim = transformer.get_embedding_dimension()
    modules = [transformer, Pooling(dim, "cls")]
    if getattr(config, "projection_dim", 0):
        projection = encoder.encode_proj
        modules.append(Dense(dim, projection.out_features, activation_function=None,
                             init_weight=projection.weight.detach().clone(), init_bias=projection.bias.detach().clone()))
    logger.info("loaded DPR checkpoint %s (%s) through its inner BERT", path, architecture)
    return modules


def _tower(name: str, max_seq_length: int) -> list:
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoConfig

    path = _resolve(name)
    if AutoConfig.from_pretrained(path).model_type == "dpr":
        return _dpr_tower(path, max_seq_length)
    transformer = Transformer(path, max_seq_length=max_seq_length)
    return [transformer, Pooling(transformer.get_embedding_dimension(), "cls")]


def is_saved_model(model_ref) -> bool:
    """Whether ``model_ref`` is a saved two-tower model folder (this family's fine-tuned output)."""
    modules = Path(str(model_ref)) / "modules.json"
    return modules.is_file() and any(m.get("type", "").endswith("Router") for m in json.loads(modules.read_text()))


def build_model(query_model: str, passage_model: str, *, max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH, device=None):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Router

    router = Router.for_query_document(query_modules=_tower(query_model, max_seq_length),
                                       document_modules=_tower(passage_model, max_seq_length))
    return SentenceTransformer(modules=[router], similarity_fn_name="dot", device=device)


def load(model_ref: str | None, config: Mapping | None = None):
    """A fine-tuned folder as saved by ``train``, or two fresh towers (see ``tower_refs``)."""
    from sentence_transformers import SentenceTransformer

    config = config or {}
    max_seq_length = int(config.get("max_seq_length") or DEFAULT_MAX_SEQ_LENGTH)
    if is_saved_model(model_ref):
        model = SentenceTransformer(resolve_model(str(model_ref)), device=config.get("device"), local_files_only=True)
        model.max_seq_length = max_seq_length
        return model
    query_model, passage_model = tower_refs(config, model_ref)
    return build_model(query_model, passage_model, max_seq_length=max_seq_length, device=config.get("device"))


def encode_queries(model, texts: list[str], *, batch_size: int = 64, progress: bool = True) -> np.ndarray:
    return model.encode_query(texts, batch_size=batch_size, convert_to_numpy=True,
                              show_progress_bar=progress).astype(np.float32)


def encode_passages(model, texts: list[str], *, batch_size: int = 64, progress: bool = True) -> np.ndarray:
    return model.encode_document(texts, batch_size=batch_size, convert_to_numpy=True,
                                 show_progress_bar=progress).astype(np.float32)


def train(config: Mapping, data: TrainingData, out_dir: str | os.PathLike, settings: TrainSettings, *,
          checkpoint_dir: str | os.PathLike, callbacks=()) -> dict:
    from sentence_transformers import util
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from transformers import set_seed

    set_seed(settings.seed)
    query_model, passage_model = tower_refs(config)
    model = load(None, config)
    columns = triplet_columns(data, settings.negatives_per_query)
    batch_size = int(config.get("encode_batch_size", 64))
    validator = vector_validator(data, lambda m, texts: encode_queries(m, texts, batch_size=batch_size, progress=False),
                                 lambda m, docs: encode_passages(m, [doc_text(d) for d in docs], batch_size=batch_size))
    # DPR's loss: cross-entropy over dot products with the positive, the other in-batch passages and hard negatives.
    loss = MultipleNegativesRankingLoss(model, scale=1.0, similarity_fct=util.dot_score)
    summary = fit(
        model, loss, columns, validator, settings, config={"family": "dpr", **dict(config)},
        out_dir=out_dir, checkpoint_dir=checkpoint_dir, callbacks=callbacks,
        # The Router sends each column through its tower: questions -> query, passages -> document.
        extra_args={"router_mapping": {c: "query" if c == "anchor" else "document" for c in columns}},
    )
    return {"family": "dpr", "query_model": query_model, "passage_model": passage_model, **summary}


def build_index(model_ref: str, corpus: Mapping[str, dict], index_dir: str | os.PathLike, config: Mapping) -> dict:
    model, identity = loaded_with_identity(lambda: load(model_ref, config))
    doc_ids = list(corpus)
    embeddings = encode_passages(model, [doc_text(corpus[d]) for d in doc_ids],
                                 batch_size=int(config.get("encode_batch_size", 64)))
    faiss_config = config.get("faiss", {}) or {}
    kind = faiss_config.get("kind", "flat")
    index = build_faiss_index(embeddings, kind, **{k: v for k, v in faiss_config.items() if k in FAISS_BUILD_KEYS})
    # `encoder` is what search loads to encode queries with the same model's question tower.
    encoder = str(model_ref) if is_saved_model(model_ref) else None
    info = {"family": "dpr", "encoder": encoder, "towers": None if encoder else list(tower_refs(config, model_ref)),
            "kind": kind, "dim": int(embeddings.shape[1]), "normalized": False, "similarity": "dot",
            "encoder_identity": identity}
    save_dense_index(index, doc_ids, index_dir, info)
    return {"num_docs": len(doc_ids), "dim": int(embeddings.shape[1]), "kind": kind,
            "index_bytes": (Path(index_dir) / "index.faiss").stat().st_size}


def embedder(index_dir: str | os.PathLike, config: Mapping) -> Embedder:
    """The two towers ``index_dir`` was built with (checked: same weights), encoding in its precision."""
    info = read_index_info(index_dir)

    def load_encoder():
        if info.get("encoder"):
            return load(info["encoder"], config)
        query_model, passage_model = info["towers"]
        return build_model(query_model, passage_model, device=config.get("device"),
                           max_seq_length=int(config.get("max_seq_length") or DEFAULT_MAX_SEQ_LENGTH))

    model = load_for_index(load_encoder, info, f"index {index_dir}")
    batch_size, precision = int(config.get("encode_batch_size", 64)), index_precision(info)

    def queries(texts: list[str]) -> np.ndarray:
        with inference_precision(precision):
            return encode_queries(model, texts, batch_size=batch_size, progress=False)

    def documents(docs) -> np.ndarray:
        with inference_precision(precision):
            return encode_passages(model, [doc_text(d) for d in docs], batch_size=batch_size)

    return Embedder(model=model, encode_queries=queries, encode_documents=documents)


def search(index_dir: str | os.PathLike, queries: Mapping[str, str], k: int, config: Mapping) -> dict:
    faiss_config = config.get("faiss", {}) or {}
    searcher = FaissSearcher(index_dir, **{k_: v for k_, v in faiss_config.items() if k_ in FAISS_SEARCH_KEYS})
    qids = list(queries)
    vectors = embedder(index_dir, config).encode_queries([queries[q] for q in qids])
    return searcher.batch_search(vectors, qids, k)
