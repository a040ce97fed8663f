"""SPECTER2 (Singh et al., 2023, SciRepEval): one shared BERT body, task adapters switched by input type.

Queries go through the ad-hoc query adapter (``allenai/specter2_adhoc_query``), documents through the proximity
adapter (``allenai/specter2``), both on ``allenai/specter2_base``; documents are ``title + [SEP] + abstract``
and the embedding is the final [CLS] vector, as on the SPECTER2 model cards.

Similarity: SPECTER2 is trained with a triplet margin loss on Euclidean distance (margin 1) and SciRepEval ranks
search candidates by Euclidean distance, so the default ``similarity: l2`` scores a document by ``-||q - d||``
on the raw (unnormalised) CLS vectors, searched with a faiss L2 index (flat, HNSW or IVF-PQ); search reports
``-||q - d||`` so that higher is better as for the other families. ``dot`` and ``cosine`` (faiss inner product,
as the dense family) are available as alternatives.

An adapter param set to null asks for a freshly initialised bottleneck adapter (``seq_bn``, seeded so index and
search build the same ones), e.g. offline, where the adapters cannot be fetched; a named adapter that cannot be
loaded is an error, never a silent fresh one.

Training uses the transformers ``Trainer`` around a sentence-transformers-style loss module
(``TripletLoss`` or ``MultipleNegativesRankingLoss``): seeded, tqdm progress, validation nDCG@10 every epoch with
the best epoch kept, one checkpoint per epoch in ``checkpoint_dir`` resumed after a failure, and the callbacks
(e.g. DVCLive) the train stage passes. With ``train_body: false`` only the two adapters are trained.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..dense_index import FaissSearcher, build_faiss_index, read_index_info, save_dense_index
from ..hub import hub_reachable, resolve_model
from ..identity import index_precision, load_for_index, loaded_with_identity
from ..precision import inference_precision
from .base import TrainingData, TrainSettings, is_unset, settings_dict, whole_run_training_loss, with_family_overrides

TRAINABLE = True
DEFAULT_BASE_MODEL = "allenai/specter2_base"
DEFAULT_DOCUMENT_ADAPTER = "allenai/specter2"
DEFAULT_QUERY_ADAPTER = "allenai/specter2_adhoc_query"
DEFAULT_MAX_SEQ_LENGTH = 512
SIMILARITIES = ("l2", "dot", "cosine")
LOSSES = ("triplet", "mnrl")
ROLES = ("query", "document")
# Adapter names inside the model: distinct from every BERT module name (BERT has `...attention.self.query`).
ADAPTER_NAMES = {"query": "query_adapter", "document": "document_adapter"}
FRESH_ADAPTER_SEEDS = {"query": 1, "document": 2}
META_FILE = "specter2.json"
FAISS_BUILD_KEYS = ("hnsw_m", "hnsw_ef_construction", "ivf_nlist", "pq_m")
FAISS_SEARCH_KEYS = ("hnsw_ef_search", "ivf_nprobe")

logger = logging.getLogger(__name__)


def _adapter_cached(adapter_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(adapter_id, "adapter_config.json"), str)


class AdapterNotLoaded(RuntimeError):
    pass


def attach_adapter(model, role: str, source: str | None, fresh_config: str = "seq_bn") -> bool:
    """Add the ``role`` adapter to ``model``: loaded from ``source`` (hub id or folder), or freshly initialised
    (seeded) when ``source`` is unset, which is how params ask for fresh adapters. A named adapter that cannot be
    loaded is an error: falling back silently would report the base model's numbers as SPECTER2's.
    Returns whether pretrained weights were loaded; the adapter's identity is recorded (``retrieval.identity``)."""
    from ..identity import Resolution, hub_snapshot_resolution, local_resolution, record

    name = ADAPTER_NAMES[role]
    if not is_unset(source):
        local = Path(str(source)).expanduser()
        reachable = hub_reachable()
        if local.is_dir() or reachable or _adapter_cached(str(source)):
            try:
                model.load_adapter(str(local) if local.is_dir() else str(source), load_as=name, with_head=False)
            except Exception as err:  # noqa: BLE001 - re-raised with what to do about it
                raise AdapterNotLoaded(
                    f"SPECTER2 {role} adapter {source!r} could not be loaded ({type(err).__name__}: {err}). "
                    f"Give a loadable adapter, or set models.specter2.{role}_adapter to null to train a freshly "
                    f"initialised {fresh_config} adapter") from err
            record(local_resolution(str(source), local) if local.is_dir() else
                   hub_snapshot_resolution(str(source), "hub" if reachable else "hub-cache", "adapter_config.json"))
            return True
        raise AdapterNotLoaded(
            f"SPECTER2 {role} adapter {source!r}: the Hugging Face hub cannot be reached and it is not in the hub "
            f"cache. Download it to a folder and set models.specter2.{role}_adapter to it, or set it to null for a "
            f"freshly initialised {fresh_config} adapter (zero-shot numbers are then the base model's, not SPECTER2's)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(FRESH_ADAPTER_SEEDS[role])
        model.add_adapter(name, config=fresh_config)
    record(Resolution(ref=f"fresh {role} adapter", source="fresh",
                      sha256=f"{fresh_config}:seed{FRESH_ADAPTER_SEEDS[role]}"))
    return False


def document_text(doc: Mapping, sep_token: str) -> str:
    """SPECTER2's document input: ``title + [SEP] + abstract``."""
    return f"{doc.get('title') or ''}{sep_token}{doc.get('text') or ''}"


class Specter2Encoder(nn.Module):
    """A BERT body with a query adapter and a document adapter; ``forward(features, role)`` -> CLS embeddings."""

    def __init__(self, model, tokenizer, *, similarity: str = "l2", max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
                 info: dict | None = None):
        super().__init__()
        if similarity not in SIMILARITIES:
            raise ValueError(f"unknown SPECTER2 similarity {similarity!r}: use one of {', '.join(SIMILARITIES)}")
        self.model = model
        self.tokenizer = tokenizer
        self.similarity = similarity
        self.max_seq_length = int(max_seq_length)
        self.info = dict(info or {})

    # --- inputs -------------------------------------------------------------------------------------------------
    def document_texts(self, docs: list[Mapping]) -> list[str]:
        return [document_text(doc, self.tokenizer.sep_token) for doc in docs]

    def tokenize(self, texts: list[str]) -> dict:
        return dict(self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_seq_length,
                                   return_tensors="pt", return_token_type_ids=False))

    # --- embeddings -----------------------------------------------------------------------------------------------
    def forward(self, features: Mapping, role: str) -> torch.Tensor:
        from adapters import AdapterSetup

        with AdapterSetup(ADAPTER_NAMES[role]):
            return self.model(**features).last_hidden_state[:, 0]

    @torch.no_grad()
    def encode(self, texts: list[str], role: str, *, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        from tqdm.auto import tqdm

        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # similar lengths share a batch: less padding
        chunks = []
        for start in tqdm(range(0, len(order), batch_size), desc=f"encode {role}", disable=not progress):
            features = self.tokenize([texts[i] for i in order[start:start + batch_size]])
            chunks.append(self({k: v.to(device) for k, v in features.items()}, role).float().cpu())
        self.train(was_training)
        embeddings = torch.cat(chunks) if chunks else torch.empty(0, self.dim)
        out = torch.empty_like(embeddings)
        out[torch.tensor(order, dtype=torch.long)] = embeddings
        return out.numpy().astype(np.float32)

    def encode_queries(self, queries: list[str], **kwargs) -> np.ndarray:
        return self.encode(list(queries), "query", **kwargs)

    def encode_documents(self, docs: list[Mapping], **kwargs) -> np.ndarray:
        return self.encode(self.document_texts(docs), "document", **kwargs)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    # --- similarity -----------------------------------------------------------------------------------------------
    def scores(self, queries: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
        """[num queries, num docs] similarity matrix (higher is better)."""
        if self.similarity == "l2":
            return -torch.cdist(queries, docs)
        if self.similarity == "cosine":
            queries, docs = F.normalize(queries, dim=-1), F.normalize(docs, dim=-1)
        return queries @ docs.T

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Row-wise distance for the triplet loss (lower is closer); Euclidean for l2, as nn.TripletMarginLoss."""
        if self.similarity == "l2":
            return F.pairwise_distance(a, b)
        if self.similarity == "cosine":
            return 1 - F.cosine_similarity(a, b)
        return -(a * b).sum(-1)

    # --- trainable parameters -------------------------------------------------------------------------------------
    def adapter_parameter_names(self) -> set[str]:
        names = set(ADAPTER_NAMES.values())
        return {n for n, _ in self.model.named_parameters() if names & set(n.split("."))}

    def set_trainable(self, train_body: bool) -> int:
        """Freeze the body unless ``train_body``; adapters always train. Returns the trainable parameter count."""
        adapter_names = self.adapter_parameter_names()
        if not adapter_names:
            raise RuntimeError("no adapter parameters found in the SPECTER2 model")
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(train_body or name in adapter_names)
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    # --- persistence ----------------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> None:
        """Body + both adapters via ``save_pretrained`` (AutoAdapterModel reloads them), each adapter also on its own
        via ``save_adapter`` in ``adapters/<role>`` (loadable onto the base with ``load_adapter``), the tokenizer and
        ``specter2.json``."""
        folder = Path(folder)
        self.model.save_pretrained(str(folder))
        self.tokenizer.save_pretrained(str(folder))
        for role in ROLES:
            target = folder / "adapters" / role
            target.mkdir(parents=True, exist_ok=True)
            self.model.save_adapter(str(target), ADAPTER_NAMES[role], with_head=False)
        meta = {**self.info, "similarity": self.similarity, "max_seq_length": self.max_seq_length,
                "adapters": dict(ADAPTER_NAMES)}
        (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def is_saved_model(model_ref) -> bool:
    return not is_unset(model_ref) and (Path(str(model_ref)) / META_FILE).is_file()


def load(model_ref: str | None, config: Mapping | None = None) -> Specter2Encoder:
    """A folder saved by ``train`` (``Specter2Encoder.save``), or ``model_ref`` (default: ``config.base_model``) as
    the body with the configured adapters (fresh ones where an adapter param is null)."""
    from adapters import AutoAdapterModel
    from transformers import AutoTokenizer

    config = config or {}
    device = config.get("device")
    if is_saved_model(model_ref):
        folder = Path(resolve_model(str(model_ref)))  # a local folder: resolving it records its identity
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        model = AutoAdapterModel.from_pretrained(str(folder))
        present = set(model.adapters_config.adapters)
        for role in ROLES:
            if ADAPTER_NAMES[role] not in present:
                model.load_adapter(str(folder / "adapters" / role), load_as=ADAPTER_NAMES[role], with_head=False)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        max_seq_length = config.get("max_seq_length") or meta.get("max_seq_length") or DEFAULT_MAX_SEQ_LENGTH
        encoder = Specter2Encoder(model, tokenizer, similarity=meta.get("similarity", "l2"),
                                  max_seq_length=max_seq_length, info={k: meta[k] for k in meta if k in (
                                      "base_model", "adapter_sources", "pretrained_adapters")})
        return encoder.to(device) if device else encoder

    base = str(model_ref) if not is_unset(model_ref) else str(config.get("base_model") or DEFAULT_BASE_MODEL)
    path = resolve_model(base)
    model = AutoAdapterModel.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    sources = {"query": config.get("query_adapter", DEFAULT_QUERY_ADAPTER),
               "document": config.get("document_adapter", DEFAULT_DOCUMENT_ADAPTER)}
    fresh_config = str(config.get("fresh_adapter_config") or "seq_bn")
    pretrained = {role: attach_adapter(model, role, sources[role], fresh_config) for role in ROLES}
    encoder = Specter2Encoder(
        model, tokenizer, similarity=str(config.get("similarity") or "l2"),
        max_seq_length=config.get("max_seq_length") or DEFAULT_MAX_SEQ_LENGTH,
        info={"base_model": base, "adapter_sources": {r: None if is_unset(s) else str(s) for r, s in sources.items()},
              "pretrained_adapters": pretrained},
    )
    return encoder.to(device) if device else encoder


# --- losses (sentence-transformers style: an nn.Module holding the model, forward -> scalar loss) ----------------------
class TripletLoss(nn.Module):
    """SPECTER's loss: ``max(0, d(q, p) - d(q, n) + margin)`` averaged over every (row, hard negative); with
    ``similarity: l2`` it is ``nn.TripletMarginLoss(margin)`` (Euclidean distance)."""

    def __init__(self, encoder: Specter2Encoder, margin: float = 1.0):
        super().__init__()
        self.encoder = encoder
        self.margin = float(margin)

    def forward(self, query: dict, positive: dict, negatives: dict, doc_keys: torch.Tensor | None = None) -> torch.Tensor:
        q = self.encoder(query, "query")
        p = self.encoder(positive, "document")
        n = self.encoder(negatives, "document").view(q.shape[0], -1, q.shape[1])  # [batch, negatives, dim]
        per_negative = [F.triplet_margin_with_distance_loss(q, p, n[:, j], distance_function=self.encoder.distance,
                                                            margin=self.margin) for j in range(n.shape[1])]
        return torch.stack(per_negative).mean()


class MultipleNegativesRankingLoss(nn.Module):
    """Cross-entropy of each query's positive against all positives and hard negatives in the batch; a column
    holding the same text as the row's positive (a duplicate) is masked out rather than counted as a negative."""

    def __init__(self, encoder: Specter2Encoder, scale: float | None = None):
        super().__init__()
        self.encoder = encoder
        self.scale = float(scale if scale is not None else (20.0 if encoder.similarity == "cosine" else 1.0))

    def forward(self, query: dict, positive: dict, negatives: dict, doc_keys: torch.Tensor | None = None) -> torch.Tensor:
        q = self.encoder(query, "query")
        docs = torch.cat([self.encoder(positive, "document"), self.encoder(negatives, "document")])
        logits = self.encoder.scores(q, docs) * self.scale
        rows = torch.arange(q.shape[0], device=q.device)
        if doc_keys is not None:
            duplicate = doc_keys[None, :] == doc_keys[rows, None]
            duplicate[rows, rows] = False
            logits = logits.masked_fill(duplicate, float("-inf"))
        return F.cross_entropy(logits, rows)


def make_loss(config: Mapping, encoder: Specter2Encoder) -> nn.Module:
    name = str(config.get("loss") or "triplet")
    if name == "triplet":
        return TripletLoss(encoder, margin=float(config.get("margin", 1.0)))
    if name == "mnrl":
        return MultipleNegativesRankingLoss(encoder, scale=config.get("scale"))
    raise ValueError(f"unknown SPECTER2 loss {name!r}: use one of {', '.join(LOSSES)}")


# --- training -----------------------------------------------------------------------------------------------------
def _rows(data: TrainingData, sep_token: str, negatives_per_query: int) -> list[dict]:
    """One row per (query, positive) with its first ``negatives_per_query`` hard negatives; shorter rows dropped."""
    rows = []
    for example in data.examples:
        negatives = example["negatives"][:negatives_per_query]
        if len(negatives) < negatives_per_query:
            continue
        rows.append({"query": example["query"], "positive": document_text(example["positive"], sep_token),
                     "negatives": [document_text(n, sep_token) for n in negatives]})
    if not rows:
        raise ValueError("no training examples with enough hard negatives: check the mine stage's output and params")
    return rows


class _Collator:
    def __init__(self, encoder: Specter2Encoder):
        self.encoder = encoder

    def __call__(self, rows: list[dict]) -> dict:
        positives = [r["positive"] for r in rows]
        negatives = [n for r in rows for n in r["negatives"]]
        texts: dict[str, int] = {}
        keys = [texts.setdefault(t, len(texts)) for t in positives + negatives]  # equal text -> equal key
        return {"query": self.encoder.tokenize([r["query"] for r in rows]), "positive": self.encoder.tokenize(positives),
                "negatives": self.encoder.tokenize(negatives), "doc_keys": torch.tensor(keys, dtype=torch.long)}


def validator(encoder: Specter2Encoder, data: TrainingData, *, batch_size: int = 32):
    """Retrieval validation over ``data.val_corpus`` with the encoder's own similarity (see ``validation.py``)."""
    from .validation import vector_validator

    # cosine: encode_* give raw CLS vectors, normalised by the search; l2 and dot use them as they are.
    return vector_validator(data, lambda m, texts: m.encode_queries(texts, batch_size=batch_size),
                            lambda m, docs: m.encode_documents(docs, batch_size=batch_size, progress=True),
                            similarity=encoder.similarity)


class _TrainingModule(nn.Module):
    """What the Trainer trains and checkpoints: the loss (holding the encoder), whose checkpoints keep only the
    trainable parameters, once each (adapters tie a prompt-tuning alias to the word embeddings). The Trainer then
    treats the other keys as deliberately not saved (``_keys_to_ignore_on_save``) when it reloads a checkpoint."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss
        seen, saved = set(), []
        for name, parameter in self.named_parameters(remove_duplicate=False):
            if parameter.requires_grad and parameter.data_ptr() not in seen:
                seen.add(parameter.data_ptr())
                saved.append(name)
        self._keys_saved = saved
        self._keys_to_ignore_on_save = [k for k in self.state_dict(keep_vars=True) if k not in set(saved)]

    def checkpoint_state_dict(self) -> dict:
        state = self.state_dict()
        return {k: state[k].contiguous() for k in self._keys_saved}

    def tie_weights(self) -> None:  # the Trainer calls this after loading a checkpoint without the ignored keys
        pass

    def forward(self, **inputs) -> torch.Tensor:
        return self.loss(**inputs)


def _trainer_class():
    from transformers import Trainer

    class Specter2Trainer(Trainer):
        """Trains a ``_TrainingModule``; evaluation is retrieval nDCG@10 on the validation queries."""

        def __init__(self, *args, validate, **kwargs):
            super().__init__(*args, **kwargs)
            self._validate = validate  # () -> {"val_ndcg_at_10": ..., ...}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = model(**inputs)
            return (loss, None) if return_outputs else loss

        def _save(self, output_dir=None, state_dict=None):
            super()._save(output_dir, state_dict=self.model.checkpoint_state_dict())

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            metrics = {f"{metric_key_prefix}_{name}": float(value) for name, value in self._validate().items()}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return Specter2Trainer


def train(config: Mapping, data: TrainingData, out_dir: str | os.PathLike, settings: TrainSettings, *,
          checkpoint_dir: str | os.PathLike, callbacks=()) -> dict:
    """As ``st_training.fit`` (validation before the first step and after every epoch, the best of base and epochs
    kept, step checkpoints keyed on the rows' hash) around the transformers Trainer and SPECTER2's own loss."""
    from transformers import TrainingArguments, set_seed

    from ..precision import trainer_precision_args

    from .checkpoints import (KeepBest, check_selection, prepare_checkpoint_dir, rows_fingerprint, save_kept_model,
                              score_final_epoch, selection_summary)

    check_selection(settings.selection, "train.selection")
    set_seed(settings.seed)
    encoder = load(None, config)
    train_body = bool(config.get("train_body", False))
    trainable = encoder.set_trainable(train_body)
    loss = make_loss(config, encoder)
    rows = _rows(data, encoder.tokenizer.sep_token, settings.negatives_per_query)
    validate = validator(encoder, data, batch_size=int(config.get("encode_batch_size", 32)))
    folder, resumable = prepare_checkpoint_dir(
        checkpoint_dir, {"family": "specter2", "config": dict(config), "settings": settings_dict(settings),
                         "rows": rows_fingerprint({key: [row[key] for row in rows]
                                                   for key in ("query", "positive", "negatives")}),
                         "validation": validate.task}
    )
    encoder.info["train_body"] = train_body
    keeper = KeepBest(folder, f"eval_{validate.primary_metric}", save=lambda _module, path: encoder.save(path),
                      include_base=settings.selection == "validation")
    if not keeper.has_base:
        keeper.record("base", validate.score_base(encoder), encoder, 0)
    args = TrainingArguments(
        output_dir=str(folder),
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=with_family_overrides(settings, config).learning_rate,
        warmup_ratio=settings.warmup_ratio,
        seed=settings.seed,
        data_seed=settings.seed,
        eval_strategy="epoch",
        save_strategy="steps",
        save_steps=max(1, int(settings.checkpoint_steps)),
        save_total_limit=1,
        load_best_model_at_end=False,  # KeepBest keeps the best, the base model included
        logging_steps=5,
        report_to="none",
        disable_tqdm=False,
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        **trainer_precision_args(settings.precision),
    )
    trainer = _trainer_class()(
        model=_TrainingModule(loss), args=args, train_dataset=rows, eval_dataset=list(data.val_queries),
        data_collator=_Collator(encoder), callbacks=[*callbacks, keeper], validate=lambda: validate(encoder),
    )
    result = trainer.train(resume_from_checkpoint=True if resumable else None)
    score_final_epoch(keeper, settings.epochs, lambda: validate(encoder)[validate.primary_metric], encoder,
                      trainer.state.global_step)
    save_kept_model(keeper, out_dir, encoder.save)
    return {
        "family": "specter2",
        "base_model": encoder.info.get("base_model"),
        "pretrained_adapters": int(all(encoder.info.get("pretrained_adapters", {}).values())),
        "loss": str(config.get("loss") or "triplet"),
        "train_body": int(train_body),
        "trainable_parameters": int(trainable),
        "train_examples": len(rows),
        "steps": int(result.global_step),
        "train_loss": whole_run_training_loss(result.training_loss, trainer.state.log_history, resumable),
        **selection_summary(keeper),
        "resumed": resumable,
    }


# --- index and search ---------------------------------------------------------------------------------------------
def build_l2_index(embeddings: np.ndarray, kind: str = "flat", *, hnsw_m: int = 32, hnsw_ef_construction: int = 200,
                   ivf_nlist: int = 1024, pq_m: int = 16, seed: int = 42):
    """The Euclidean counterpart of ``dense_index.build_faiss_index`` (same kinds and parameters); faiss returns
    squared distances, nearest first. (HNSW graphs navigate far worse with inner product over MIPS-transformed
    vectors than with L2 itself, hence a native L2 index.)"""
    import faiss

    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatL2(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_L2)
        index.hnsw.efConstruction = hnsw_ef_construction
    elif kind == "ivfpq":
        if dim % pq_m:
            raise ValueError(f"ivfpq: pq_m={pq_m} must divide the embedding dimension {dim}")
        nlist = max(1, min(ivf_nlist, n // 39))  # faiss wants ~39 training points per centroid
        index = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, nlist, pq_m, 8, faiss.METRIC_L2)
        index.cp.seed = seed
        index.train(vectors)
    else:
        raise ValueError(f"unknown faiss index kind {kind!r}: use one of flat, hnsw, ivfpq")
    index.add(vectors)
    return index


def _normalize(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def build_index(model_ref: str, corpus: Mapping[str, dict], index_dir: str | os.PathLike, config: Mapping) -> dict:
    encoder, identity = loaded_with_identity(lambda: load(model_ref, config))
    doc_ids = list(corpus)
    embeddings = encoder.encode_documents([corpus[d] for d in doc_ids], progress=True,
                                          batch_size=int(config.get("encode_batch_size", 32)))
    faiss_config = config.get("faiss", {}) or {}
    kind = faiss_config.get("kind", "flat")
    build_args = {k: v for k, v in faiss_config.items() if k in FAISS_BUILD_KEYS}
    if encoder.similarity == "l2":
        index = build_l2_index(embeddings, kind, **build_args)
    else:
        index = build_faiss_index(_normalize(embeddings) if encoder.similarity == "cosine" else embeddings, kind,
                                  **build_args)
    saved = is_saved_model(model_ref)
    info = {"family": "specter2", "encoder": str(model_ref) if saved else None, "kind": kind,
            "dim": int(embeddings.shape[1]), "similarity": encoder.similarity,
            "normalized": encoder.similarity == "cosine",
            # enough to rebuild the same (baseline) model for the queries
            "base_model": None if saved else encoder.info.get("base_model"),
            "adapter_sources": None if saved else encoder.info.get("adapter_sources"),
            "pretrained_adapters": encoder.info.get("pretrained_adapters"), "encoder_identity": identity}
    save_dense_index(index, doc_ids, index_dir, info)
    return {"num_docs": len(doc_ids), "dim": int(embeddings.shape[1]), "kind": kind,
            "pretrained_adapters": int(all((encoder.info.get("pretrained_adapters") or {}).values())),
            "index_bytes": (Path(index_dir) / "index.faiss").stat().st_size}


def search(index_dir: str | os.PathLike, queries: Mapping[str, str], k: int, config: Mapping) -> dict:
    faiss_config = config.get("faiss", {}) or {}
    searcher = FaissSearcher(index_dir, **{k_: v for k_, v in faiss_config.items() if k_ in FAISS_SEARCH_KEYS})
    info = read_index_info(index_dir)

    def load_encoder():
        if info.get("encoder"):
            return load(info["encoder"], config)
        sources = info.get("adapter_sources") or {}
        return load(info["base_model"], {**dict(config), "similarity": info["similarity"],
                                         "query_adapter": sources.get("query"),
                                         "document_adapter": sources.get("document")})

    encoder = load_for_index(load_encoder, info, f"index {index_dir}")
    if encoder.similarity != info["similarity"]:
        raise ValueError(f"{index_dir}: index built for {info['similarity']} similarity, model uses {encoder.similarity}")
    qids = list(queries)
    with inference_precision(index_precision(info)):
        vectors = encoder.encode_queries([queries[q] for q in qids], batch_size=int(config.get("encode_batch_size", 32)))
    if info["similarity"] == "cosine":
        vectors = _normalize(vectors)
    hits = searcher.batch_search(vectors, qids, k)
    if info["similarity"] != "l2":
        return hits
    # faiss gives squared Euclidean distances, nearest first: report -||q - d||, higher is better as elsewhere
    return {qid: [(doc, -float(np.sqrt(max(d, 0.0)))) for doc, d in doc_hits] for qid, doc_hits in hits.items()}
