"""Dense bi-encoder (sentence-transformers), fine-tuned with MultipleNegativesRankingLoss over
(query, positive, hard negatives), or distilled from a cross-encoder with Margin-MSE; searched with faiss.

``query_prefix`` (config, default none) is prepended to every query the family encodes: in search, in validation,
in the training rows, and by mining through :func:`encode_queries`; documents never get it. bge wants its
retrieval instruction there (``retrieval.onnx_import.BGE_QUERY_INSTRUCTION``); sentence-transformers' own prompts
are not applied by ``encode``, so this setting is the one place the instruction comes from."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from ..dataset import doc_text
from ..dense_index import FaissSearcher, build_faiss_index, read_index_info, save_dense_index
from ..hub import resolve_model
from ..backends import backend_record, encode_batch_size, load_sentence_transformer
from ..embedding_cache import cached_embeddings
from ..encoding import Encoding, current_encoding, index_encoding
from ..identity import check_same_backend, index_precision, load_for_index, loaded_with_identity
from ..precision import inference_precision
from .base import Embedder, TrainingData, TrainSettings, is_unset, with_family_overrides
from .st_training import ScaledSimilarity, fit, margin_columns, triplet_columns
from .validation import vector_validator

TRAINABLE = True
DISTILLABLE = True


def load(model_ref: str, config: Mapping | None = None):
    """The PyTorch model (what training updates)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(resolve_model(model_ref), device=(config or {}).get("device"))
    if config and config.get("max_seq_length"):
        model.max_seq_length = int(config["max_seq_length"])
    return model


def load_encoder(model_ref: str, config: Mapping | None = None, encoding: Encoding | None = None):
    """The model as the index and search encode with it: PyTorch, or its (cached) export for ``encoding``."""
    encoding = encoding or current_encoding()
    if not encoding.exported:
        return load(model_ref, config)
    return _load_export(resolve_model(model_ref), config, encoding)


def _load_export(folder: str, config: Mapping | None, encoding: Encoding):
    model = load_sentence_transformer(folder, backend=encoding.backend, quantize=encoding.quantize,
                                      search_dirs=encoding.export_dirs)
    if config and config.get("max_seq_length"):
        model.max_seq_length = int(config["max_seq_length"])
    return model


def encoder_record(model) -> dict | None:
    """What an exported encoder computes with (for the index record and the embedding cache); None for torch."""
    try:
        record = backend_record(model)
    except ValueError:
        return None
    if record["backend"] == "torch":
        return None
    return {key: record[key] for key in ("backend", "quantize", "variant", "file", "sha256")}


def _cache_key(model, batch_size: int) -> dict | None:
    record = encoder_record(model)
    return None if record is None else {**record, "max_seq_length": int(model.max_seq_length),
                                        "normalize": _normalizes(model),
                                        "batch_size": encode_batch_size(model, batch_size)}


def encode_documents(model, documents: list[Mapping], *, batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """Document vectors; an exported encoder's are stored in (and read from) the embedding cache."""
    return cached_embeddings(_cache_key(model, batch_size), [doc_text(d) for d in documents],
                             lambda texts: encode(model, texts, batch_size=batch_size, progress=progress))


class ExportedSnapshot:
    """``prepare`` for validation with an exported encoding: the model in training is saved, exported and loaded as
    the index stage loads the fine-tuned model, so validation scores what will be indexed and its corpus
    embeddings (cached) are the index's. The export costs seconds; encoding on it is what it saves."""

    def __init__(self, config: Mapping, encoding: Encoding, workdir: str | os.PathLike) -> None:
        self.config, self.encoding, self.workdir = dict(config), encoding, Path(workdir)

    def __call__(self, model):
        snapshot = self.workdir / "validation-snapshot"
        model.save_pretrained(str(snapshot))
        # not through resolve_model: the snapshot is scratch, not part of the trained model's lineage
        exported = _load_export(str(snapshot), self.config, self.encoding)
        exported.max_seq_length = model.max_seq_length
        return exported


def _normalizes(model) -> bool:
    """Whether scores should be cosine: then vectors are normalised and inner product equals cosine."""
    return model.similarity_fn_name == "cosine"


def encode(model, texts: list[str], *, batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """Vectors of ``texts``; ONNX int8 exports encode one text per call, so that a vector never depends on the texts
    batched with it (``backends.encode_batch_size``)."""
    return model.encode(texts, batch_size=encode_batch_size(model, batch_size), convert_to_numpy=True,
                        show_progress_bar=progress,
                        normalize_embeddings=_normalizes(model)).astype(np.float32)


def query_prefix(config: Mapping | None) -> str:
    """The config's ``query_prefix``: a string, taken as is (trailing space included); unset means none."""
    value = (config or {}).get("query_prefix")
    if is_unset(value):
        return ""
    if not isinstance(value, str):
        raise ValueError(f"models.dense.query_prefix must be a string, got {value!r}")
    return value


def encode_queries(model, texts: list[str], config: Mapping | None, *, batch_size: int = 64,
                   progress: bool = False) -> np.ndarray:
    """Query vectors: ``encode`` of each text after the config's ``query_prefix``."""
    prefix = query_prefix(config)
    return encode(model, [prefix + text for text in texts], batch_size=batch_size, progress=progress)


def train(config: Mapping, data: TrainingData, out_dir: str | os.PathLike, settings: TrainSettings, *,
          checkpoint_dir: str | os.PathLike, callbacks=()) -> dict:
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from transformers import set_seed

    settings = with_family_overrides(settings, config)
    set_seed(settings.seed)
    model = load(config["base_model"], config)
    batch_size = int(config.get("encode_batch_size", 64))
    encoding = data.encoding
    prepare = ExportedSnapshot(config, encoding, checkpoint_dir) if encoding is not None and encoding.exported \
        else None
    # encode() normalises for cosine models, so the dot product of its vectors is the model's similarity.
    validator = vector_validator(data, lambda m, texts: encode_queries(m, texts, config, batch_size=batch_size),
                                 lambda m, docs: encode_documents(m, docs, batch_size=batch_size), prepare=prepare)
    if settings.distill:
        from sentence_transformers import util
        from sentence_transformers.losses import MarginMSELoss

        pairwise = util.pairwise_cos_sim if _normalizes(model) else util.pairwise_dot_score
        loss = MarginMSELoss(model, similarity_fct=ScaledSimilarity(pairwise, settings.distill_scale))
        columns = margin_columns(data, settings.negatives_per_query)
    else:
        loss, columns = MultipleNegativesRankingLoss(model), triplet_columns(data, settings.negatives_per_query)
    prefix = query_prefix(config)
    columns["anchor"] = [prefix + query for query in columns["anchor"]]  # the queries, as search will encode them
    summary = fit(model, loss, columns, validator, settings, config=dict(config), out_dir=out_dir,
                  checkpoint_dir=checkpoint_dir, callbacks=callbacks)
    return {"family": "dense", "base_model": config["base_model"], "loss": "margin_mse" if settings.distill else "mnrl",
            **summary}


def build_index(model_ref: str, corpus: Mapping[str, dict], index_dir: str | os.PathLike, config: Mapping) -> dict:
    model, identity = loaded_with_identity(lambda: load_encoder(model_ref, config))
    identity["backend"] = encoder_record(model) or {"backend": "torch"}
    doc_ids = list(corpus)
    embeddings = encode_documents(model, [corpus[d] for d in doc_ids], batch_size=int(config.get("encode_batch_size", 64)))
    faiss_config = config.get("faiss", {}) or {}
    kind = faiss_config.get("kind", "flat")
    index = build_faiss_index(embeddings, kind, **{k: v for k, v in faiss_config.items() if k in
                                                   ("hnsw_m", "hnsw_ef_construction", "ivf_nlist", "pq_m")})
    save_dense_index(index, doc_ids, index_dir, {"encoder": str(model_ref), "kind": kind, "dim": int(embeddings.shape[1]),
                                                 "normalized": _normalizes(model), "encoder_identity": identity})
    return {"num_docs": len(doc_ids), "dim": int(embeddings.shape[1]), "kind": kind,
            "index_bytes": (Path(index_dir) / "index.faiss").stat().st_size}


def embedder(index_dir: str | os.PathLike, config: Mapping) -> Embedder:
    """The encoder ``index_dir`` was built with (checked: same weights and backend), encoding in its precision."""
    info = read_index_info(index_dir)
    model = load_for_index(lambda: load_encoder(info["encoder"], config, index_encoding(info)), info,
                           f"index {index_dir}")
    check_same_backend(info, encoder_record(model) or {"backend": "torch"}, f"index {index_dir}")
    batch_size, precision = int(config.get("encode_batch_size", 64)), index_precision(info)

    def queries(texts: list[str]) -> np.ndarray:
        with inference_precision(precision):
            return encode_queries(model, texts, config, batch_size=batch_size)

    def documents(docs) -> np.ndarray:
        with inference_precision(precision):
            return encode_documents(model, list(docs), batch_size=batch_size)

    return Embedder(model=model, encode_queries=queries, encode_documents=documents)


def search(index_dir: str | os.PathLike, queries: Mapping[str, str], k: int, config: Mapping) -> dict:
    faiss_config = config.get("faiss", {}) or {}
    searcher = FaissSearcher(index_dir, **{k_: v for k_, v in faiss_config.items() if k_ in ("hnsw_ef_search", "ivf_nprobe")})
    qids = list(queries)
    vectors = embedder(index_dir, config).encode_queries([queries[q] for q in qids])
    return searcher.batch_search(vectors, qids, k)
