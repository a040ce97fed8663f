"""ColBERT late interaction through PyLate: one vector per token, MaxSim scoring, PyLate's contrastive loss on the
mined hard negatives, a PyLate Voyager index (token-level HNSW, then exact MaxSim over the candidates), and
:func:`rerank`, PyLate's ``rank.rerank`` of a first stage's candidates (what ColBERT does best on a CPU).

Why the encoder is defined here rather than ``pylate.models.ColBERT``: PyLate 1.6 (the newest) is written against
sentence-transformers 5.3 and pins it; on this project's 5.7 its model class fails to encode (a renamed private
method), to save (a removed attribute) and, worse, silently skips query expansion. So :class:`ColBERTEncoder`
re-implements the few lines of PyLate's tokenisation and projection exactly (prefix token after [CLS], queries padded
with [MASK] to ``query_length`` and not attended to, documents' punctuation skipped in scoring, L2-normalised
token vectors) and saves PyLate's folder layout (``modules.json``, ``1_Dense/``, ``config_sentence_transformers.json``),
while PyLate's own code does everything that does not touch sentence-transformers: the loss
(``losses.Contrastive``), MaxSim (``scores.colbert_scores``), the index (``indexes.Voyager``), retrieval
(``retrieve.ColBERT``) and reranking (``rank.rerank``).

Why Voyager and not PLAID: PyLate's PLAID runs on ``fast-plaid``, whose wheels are built for one torch each
(``torch==2.11.0`` for the newest) and would replace this project's torch; Voyager is a plain HNSW wheel.

``config`` (``models.colbert``): ``base_model``; ``embedding_size`` (the projection of a base model that has none);
``query_length`` / ``document_length`` (override the model folder's); ``encode_batch_size``; ``voyager``
(``M``, ``ef_construction``, ``ef_search``, ``k_token``: token-level candidates per query token,
``query_batch_size``). Training also
reads ``train.colbert``: ``learning_rate`` (overrides ``train.learning_rate``) and ``temperature``."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from ..dataset import doc_text
from ..hub import resolve_model
from ..identity import index_precision, load_for_index, loaded_with_identity
from ..io import atomic_dir, write_json
from ..precision import inference_precision
from .base import TrainingData, TrainSettings, is_unset, settings_dict, whole_run_training_loss, with_family_overrides
from ..colbert_folder import (ColBERTSettings, is_colbert_folder, projection_weight, read_settings,
                             save_colbert_folder, write_colbert_folder)  # noqa: F401 (save_colbert_folder: re-exported)

TRAINABLE = True
DISTILLABLE = False  # Margin-MSE through pylate.losses.Distillation is not wired in (yet)

DEFAULT_BASE_MODEL = "answerdotai/answerai-colbert-small-v1"
INDEX_INFO = "index.json"
VOYAGER_NAME = "voyager"
VOYAGER_DEFAULTS = {"M": 16, "ef_construction": 100, "ef_search": 200, "k_token": 100, "query_batch_size": 4}
# Scores of this many validation documents (and queries) at a time: the MaxSim tensor is
# queries x documents x query tokens x document tokens floats.
SCORE_DOCUMENTS, SCORE_QUERIES = 128, 32
DEPTH = 100  # validation depth, as retrieval.models.validation
# A body without a projection gets one from this seed, not train's: the baseline index, search and training's base
# model must be the very same model (identity checks cover the body's weights only).
FRESH_SEED = 42


class ColBERTEncoder(torch.nn.Module):
    """A transformer body plus a bias-free linear projection of every token; tokenises as PyLate does.

    ``forward(features)`` returns ``{"token_embeddings", "attention_mask"}`` (unnormalised, as PyLate's loss expects);
    ``skiplist`` and ``do_query_expansion`` are what ``pylate.losses.Contrastive`` reads from its model."""

    def __init__(self, body, tokenizer, projection: torch.nn.Linear, settings: ColBERTSettings) -> None:
        super().__init__()
        self.body, self.projection, self.tokenizer, self.settings = body, projection, tokenizer, settings
        if projection.in_features != body.config.hidden_size:
            raise ValueError(f"projection takes {projection.in_features} features but the body gives "
                             f"{body.config.hidden_size}")
        # PyLate pads with [MASK]: a query's expansion tokens are mask tokens, scored though not attended to.
        if tokenizer.mask_token is not None:
            tokenizer.pad_token = tokenizer.mask_token
        self.query_prefix_id = self._prefix_id(settings.query_prefix, "query_prefix")
        self.document_prefix_id = self._prefix_id(settings.document_prefix, "document_prefix")
        unknown = tokenizer.unk_token_id
        # (PyLate keeps words outside the vocabulary as [UNK], which would skip every unknown token.)
        self.skiplist = sorted({tokenizer.convert_tokens_to_ids(w) for w in settings.skiplist_words} - {unknown})

    def _prefix_id(self, prefix: str, name: str) -> int | None:
        if prefix == "":
            return None
        token = prefix.strip() or prefix
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"colbert {name} {prefix!r} is not one token of the model's vocabulary: use a token it "
                             "has (e.g. [unused0] / [unused1] for BERT) or '' for none")
        return int(token_id)

    @property
    def do_query_expansion(self) -> bool:
        return self.settings.do_query_expansion

    @property
    def embedding_size(self) -> int:
        return self.projection.out_features

    @property
    def device(self) -> torch.device:
        return self.projection.weight.device

    def tokenize(self, texts: Sequence[str], is_query: bool) -> dict[str, torch.Tensor]:
        """PyLate's ``ColBERT.tokenize``: truncate to the length minus the prefix, insert the prefix after [CLS];
        queries with expansion are padded to ``query_length`` (padding attention 0 unless attend_to_expansion)."""
        s = self.settings
        length = s.query_length if is_query else s.document_length
        prefix_id = self.query_prefix_id if is_query else self.document_prefix_id
        expand = is_query and s.do_query_expansion
        features = self.tokenizer(list(texts), max_length=length - (prefix_id is not None), truncation=True,
                                  padding="max_length" if expand else "longest", return_tensors="pt")
        features = {key: features[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in features}
        if prefix_id is not None:
            for key, value in (("input_ids", prefix_id), ("attention_mask", 1), ("token_type_ids", 0)):
                if key in features:
                    ids = features[key]
                    features[key] = torch.cat([ids[:, :1], torch.full_like(ids[:, :1], value), ids[:, 1:]], dim=1)
        if expand and s.attend_to_expansion_tokens:
            features["attention_mask"] = torch.ones_like(features["attention_mask"])
        return features

    def forward(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = {key: features[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in features}
        hidden = self.body(**inputs).last_hidden_state
        return {**features, "token_embeddings": self.projection(hidden)}

    def scoring_mask(self, features: Mapping[str, torch.Tensor], is_query: bool) -> torch.Tensor:
        """Which token vectors take part in MaxSim (PyLate's ``encode``): every query token with expansion (else the
        attended ones); the attended document tokens outside the skiplist."""
        if is_query:
            if self.settings.do_query_expansion:
                return torch.ones_like(features["input_ids"], dtype=torch.bool)
            return features["attention_mask"].bool()
        keep = features["attention_mask"].bool()
        if self.skiplist:
            keep &= ~torch.isin(features["input_ids"], torch.tensor(self.skiplist, device=keep.device))
        return keep

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], is_query: bool, *, batch_size: int = 32) -> list[torch.Tensor]:
        """L2-normalised token vectors per text (float32, CPU), the scoring tokens only; batches of similar length."""
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out: list[torch.Tensor | None] = [None] * len(texts)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            features = {k: v.to(self.device) for k, v in self.tokenize([texts[i] for i in batch], is_query).items()}
            vectors = torch.nn.functional.normalize(self(features)["token_embeddings"].float(), p=2, dim=-1)
            mask = self.scoring_mask(features, is_query)
            for row, i in enumerate(batch):
                out[i] = vectors[row][mask[row]].cpu()
        return out

    def save(self, folder: str | os.PathLike) -> None:
        """Write the model into an existing folder in PyLate's layout (``retrieval.colbert_folder``)."""
        write_colbert_folder(folder, self.body, self.tokenizer, self.projection.weight, self.settings)


def _body_folder(folder: Path) -> Path:
    """A plain transformers folder, or a sentence-transformers one (its Transformer module's folder)."""
    modules = folder / "modules.json"
    if modules.is_file():
        for module in json.loads(modules.read_text(encoding="utf-8")):
            if str(module.get("type", "")).endswith("Transformer"):
                return folder / module.get("path", "")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: neither a ColBERT folder (modules.json with a Dense module) nor a transformers "
                         "model folder (config.json)")
    return folder


def _settings_from(folder: Path, config: Mapping | None) -> ColBERTSettings:
    """The folder's token settings (PyLate's config), then the config's ``query_length`` / ``document_length``."""
    overrides = {key: int((config or {})[key]) for key in ("query_length", "document_length")
                 if not is_unset((config or {}).get(key))}
    return replace(read_settings(folder), **overrides)


def _local_folder(model_ref: str) -> Path:
    resolved = resolve_model(model_ref)
    if Path(resolved).is_dir():
        return Path(resolved)
    from huggingface_hub import snapshot_download  # a hub id while the hub is reachable

    return Path(snapshot_download(resolved))


def load(model_ref: str | None, config: Mapping | None = None, *, seed: int = FRESH_SEED) -> ColBERTEncoder:
    """The encoder of a ColBERT folder (PyLate's layout), or of a transformers body with a fresh projection to
    ``config["embedding_size"]`` (default 128) initialised from ``seed``, so the same base gives the same model."""
    from transformers import AutoModel, AutoTokenizer

    config = config or {}
    folder = _local_folder((config.get("base_model") or DEFAULT_BASE_MODEL) if is_unset(model_ref) else str(model_ref))
    settings = _settings_from(folder, config)
    if is_colbert_folder(folder):
        body_dir = _body_folder(folder)
        weight = projection_weight(folder)
        projection = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            projection.weight.copy_(weight)
    else:
        body_dir = _body_folder(folder)
        hidden = json.loads((body_dir / "config.json").read_text(encoding="utf-8"))["hidden_size"]
        generator = torch.Generator().manual_seed(int(seed))
        projection = torch.nn.Linear(hidden, int(config.get("embedding_size") or 128), bias=False)
        with torch.no_grad():  # nn.Linear's own (Kaiming uniform) initialisation, from a seeded generator
            bound = 1 / np.sqrt(hidden)
            projection.weight.copy_(torch.rand(projection.weight.shape, generator=generator) * 2 * bound - bound)
    body = AutoModel.from_pretrained(str(body_dir), add_pooling_layer=False) \
        if _is_bert(body_dir) else AutoModel.from_pretrained(str(body_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(body_dir))
    if not is_colbert_folder(folder):
        settings = _fresh_markers(body, tokenizer, settings, seed)
    encoder = ColBERTEncoder(body.eval(), tokenizer, projection, settings)
    return encoder.to(config.get("device") or "cpu")


def _fresh_markers(body, tokenizer, settings: ColBERTSettings, seed: int) -> ColBERTSettings:
    """Markers for a body that has never been a ColBERT: BERT vocabularies' [unused0] / [unused1] (the Stanford
    ColBERT convention) when present, else PyLate's [Q] / [D] added as new tokens, their embeddings seeded."""
    vocabulary = tokenizer.get_vocab()
    if "[unused0]" in vocabulary and "[unused1]" in vocabulary:
        return replace(settings, query_prefix="[unused0]", document_prefix="[unused1]")
    tokenizer.add_special_tokens({"additional_special_tokens": ["[Q]", "[D]"]})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        body.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return replace(settings, query_prefix="[Q]", document_prefix="[D]")


def _is_bert(folder: Path) -> bool:
    # ColBERT never reads BERT's pooler; not building it keeps "unused weights" warnings and random init away.
    return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type") == "bert"


def _batch_size(config: Mapping | None) -> int:
    return int((config or {}).get("encode_batch_size") or 32)


def _voyager_settings(config: Mapping | None) -> dict:
    given = dict((config or {}).get("voyager") or {})
    unknown = sorted(set(given) - set(VOYAGER_DEFAULTS))
    if unknown:
        raise ValueError(f"models.colbert.voyager: unknown key(s) {', '.join(unknown)}; known: "
                         f"{', '.join(VOYAGER_DEFAULTS)}")
    return {key: int(given.get(key, default)) for key, default in VOYAGER_DEFAULTS.items()}


# --- exact MaxSim (validation) ----------------------------------------------------------------------------------------
def _padded(vectors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    stacked = torch.nn.utils.rnn.pad_sequence(list(vectors), batch_first=True)
    lengths = torch.tensor([len(v) for v in vectors])
    return stacked, torch.arange(stacked.shape[1])[None, :] < lengths[:, None]


def maxsim_scores(queries: Sequence[torch.Tensor], documents: Sequence[torch.Tensor]) -> np.ndarray:
    """[queries, documents] MaxSim of token vectors with ``pylate.scores.colbert_scores``, in blocks."""
    from pylate.scores import colbert_scores

    scores = np.zeros((len(queries), len(documents)), dtype=np.float32)
    for d in range(0, len(documents), SCORE_DOCUMENTS):
        docs, docs_mask = _padded(documents[d:d + SCORE_DOCUMENTS])
        for q in range(0, len(queries), SCORE_QUERIES):
            query_block, _ = _padded(queries[q:q + SCORE_QUERIES])  # zero padding adds 0 to every MaxSim
            block = colbert_scores(query_block, docs, documents_mask=docs_mask, backend="torch")
            scores[q:q + SCORE_QUERIES, d:d + SCORE_DOCUMENTS] = block.float().numpy()
    return scores


def exact_search(model: ColBERTEncoder, queries: Mapping[str, str], documents: Mapping[str, Mapping], *,
                 k: int = DEPTH, batch_size: int = 32) -> dict[str, dict[str, float]]:
    """Each query's ``k`` best documents by exact MaxSim over every document (validation)."""
    from .validation import top_k_run

    qids, doc_ids = list(queries), list(documents)
    query_vectors = model.encode([queries[q] for q in qids], is_query=True, batch_size=batch_size)
    doc_vectors = model.encode([doc_text(documents[d]) for d in doc_ids], is_query=False, batch_size=batch_size)
    return top_k_run(maxsim_scores(query_vectors, doc_vectors), doc_ids, qids, k)


# --- training ---------------------------------------------------------------------------------------------------------
class TripletCollator:
    """Rows (query, positive, negative_1..n) -> one tokenised batch per column, queries first (PyLate's order)."""

    def __init__(self, model: ColBERTEncoder, columns: Sequence[str]) -> None:
        self.model, self.columns = model, list(columns)

    def __call__(self, rows: list[dict]) -> dict:
        return {"features": [self.model.tokenize([row[name] for row in rows], is_query=i == 0)
                             for i, name in enumerate(self.columns)]}


def _temperature(config: Mapping) -> float:
    """``train.colbert.temperature``: the contrastive loss's softmax temperature over MaxSim scores (PyLate's 1.0;
    MaxSim sums one cosine per query token, so scores already span tens)."""
    value = 1.0 if is_unset(config.get("temperature")) else float(config["temperature"])
    if not value > 0:
        raise ValueError(f"train.colbert.temperature must be positive, got {config.get('temperature')!r}")
    return value


def _trainer_class():
    from transformers import Trainer

    class ContrastiveTrainer(Trainer):
        """The Hugging Face Trainer (seeding, schedule, step checkpoints, resume) with PyLate's contrastive loss."""

        def __init__(self, *args, loss, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.colbert_loss = loss

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = self.colbert_loss(inputs["features"])
            return (loss, {}) if return_outputs else loss

    return ContrastiveTrainer


def _epoch_validation(keeper, validator):
    from transformers import TrainerCallback

    class EpochValidation(TrainerCallback):
        """Scores the model on validation after every epoch for KeepBest (the Trainer has no evaluator here). At the
        epoch's last step, before that step's checkpoint, as the Trainer's own evaluation would: scored at
        ``on_epoch_end`` an epoch ending on a checkpoint step that crashed would resume past it, never scored."""

        def on_step_end(self, args, state, control, model=None, **kwargs):
            epoch = state.epoch or 0.0
            if epoch >= 1 and abs(epoch - round(epoch)) < 1e-6:
                keeper.record(f"epoch {round(epoch)}", validator(model)[validator.primary_metric], model,
                              state.global_step)

    return EpochValidation()


def train(config: Mapping, data: TrainingData, out_dir: str | os.PathLike, settings: TrainSettings, *,
          checkpoint_dir: str | os.PathLike, callbacks=()) -> dict:
    from datasets import Dataset
    from pylate.losses import Contrastive
    from transformers import TrainingArguments, set_seed

    from ..precision import trainer_precision_args
    from .checkpoints import (KeepBest, check_selection, prepare_checkpoint_dir, rows_fingerprint, save_kept_model,
                              score_final_epoch, selection_summary)
    from .st_training import triplet_columns
    from .validation import RetrievalValidator, validation_task

    if settings.distill:
        raise ValueError("the colbert family does not distil (train.distill: true): set it false or use dense/splade")
    settings = with_family_overrides(settings, config)
    check_selection(settings.selection, "train.selection")
    temperature = _temperature(config)  # bad settings fail before any model loads
    set_seed(settings.seed)
    model = load(config.get("base_model"), config)
    model.train()
    batch_size = _batch_size(config)
    columns = triplet_columns(data, settings.negatives_per_query)
    validator = RetrievalValidator(
        lambda m: exact_search(m, data.val_queries, data.val_corpus, batch_size=batch_size), data.val_qrels,
        precision=data.precision, base_run=data.base_run, task=validation_task(data))
    folder, resumable = prepare_checkpoint_dir(
        checkpoint_dir, {"config": dict(config), "settings": settings_dict(settings), "rows": rows_fingerprint(columns),
                         "validation": validator.task})
    keeper = KeepBest(folder, f"eval_{validator.primary_metric}", save=lambda m, path: m.save(path),
                      include_base=settings.selection == "validation")
    if not keeper.has_base:  # a resumed run scored its base already
        keeper.record("base", validator.score_base(model), model, 0)
    args = TrainingArguments(
        output_dir=str(folder), num_train_epochs=settings.epochs, per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate, warmup_ratio=settings.warmup_ratio, seed=settings.seed,
        data_seed=settings.seed, save_strategy="steps", save_steps=max(1, int(settings.checkpoint_steps)),
        save_total_limit=1, logging_steps=5, report_to="none", dataloader_pin_memory=False,
        remove_unused_columns=False,  # the collator tokenises the text columns itself
        **trainer_precision_args(settings.precision))
    trainer = _trainer_class()(model=model, args=args, train_dataset=Dataset.from_dict(columns),
                               data_collator=TripletCollator(model, list(columns)),
                               loss=Contrastive(model, temperature=temperature),
                               callbacks=[*callbacks, _epoch_validation(keeper, validator)])
    result = trainer.train(resume_from_checkpoint=True if resumable else None)
    score_final_epoch(keeper, settings.epochs, lambda: validator(model)[validator.primary_metric], model,
                      trainer.state.global_step)
    save_kept_model(keeper, out_dir, lambda target: model.save(target))
    return {"family": "colbert", "base_model": config.get("base_model") or DEFAULT_BASE_MODEL, "loss": "contrastive",
            "train_examples": len(columns["anchor"]), "steps": int(result.global_step),
            "train_loss": whole_run_training_loss(result.training_loss, trainer.state.log_history, resumable),
            **selection_summary(keeper), "resumed": resumable}


# --- index and search -------------------------------------------------------------------------------------------------
def build_index(model_ref: str, corpus: Mapping[str, dict], index_dir: str | os.PathLike, config: Mapping) -> dict:
    """Every document's token vectors in a PyLate Voyager index, with what the encoder resolved to."""
    from pylate.indexes import Voyager

    if not corpus:
        raise ValueError("build_index: the corpus is empty")
    voyager = _voyager_settings(config)  # bad settings fail before the model loads
    model, identity = loaded_with_identity(lambda: load(model_ref, config))
    doc_ids = list(corpus)
    with inference_precision(identity["precision"]):
        vectors = model.encode([doc_text(corpus[d]) for d in doc_ids], is_query=False, batch_size=_batch_size(config))
    with atomic_dir(index_dir) as tmp:
        index = Voyager(index_folder=str(tmp), index_name=VOYAGER_NAME, override=True,
                        embedding_size=model.embedding_size, M=voyager["M"],
                        ef_construction=voyager["ef_construction"], ef_search=voyager["ef_search"])
        index.add_documents(documents_ids=doc_ids, documents_embeddings=[v.numpy() for v in vectors])
        write_json({"encoder": str(model_ref), "kind": "voyager", "dim": model.embedding_size,
                    "settings": {**asdict(model.settings), "skiplist_words": list(model.settings.skiplist_words)},
                    "voyager": voyager, "num_docs": len(doc_ids), "num_vectors": int(sum(len(v) for v in vectors)),
                    "encoder_identity": identity}, Path(tmp) / INDEX_INFO)
    return {"num_docs": len(doc_ids), "dim": model.embedding_size, "kind": "voyager",
            "num_vectors": int(sum(len(v) for v in vectors)),
            "index_bytes": sum(p.stat().st_size for p in Path(index_dir).rglob("*") if p.is_file())}


def read_index_info(index_dir: str | os.PathLike) -> dict:
    path = Path(index_dir) / INDEX_INFO
    if not path.is_file():
        raise FileNotFoundError(f"{index_dir}: not a colbert index (no {INDEX_INFO}); build it with build_index")
    return json.loads(path.read_text(encoding="utf-8"))


def search(index_dir: str | os.PathLike, queries: Mapping[str, str], k: int, config: Mapping) -> dict:
    """Voyager's token-level candidates, rescored with exact MaxSim by ``pylate.retrieve.ColBERT``; refuses to run
    with an encoder that resolves to other weights than the index was built with."""
    from pylate.indexes import Voyager
    from pylate.retrieve import ColBERT as Retriever

    info = read_index_info(index_dir)
    model = load_for_index(lambda: load(info["encoder"], config), info, f"index {index_dir}")
    voyager = {**info["voyager"], **{key: value for key, value in _voyager_settings(config).items()
                                     if key in ("ef_search", "k_token", "query_batch_size")}}
    index = Voyager(index_folder=str(index_dir), index_name=VOYAGER_NAME, override=False,
                    embedding_size=int(info["dim"]), ef_search=voyager["ef_search"])
    qids = list(queries)
    if not qids:
        return {}
    with inference_precision(index_precision(info)):
        vectors = model.encode([queries[q] for q in qids], is_query=True, batch_size=_batch_size(config))
    # Few queries per batch: PyLate fetches every candidate document's token vectors of a batch at once (on SciFact,
    # k_token 100 gives ~2,000 candidates per query: 50 queries a batch, PyLate's default, took 11 GB).
    results = Retriever(index=index).retrieve(queries_embeddings=vectors, k=k, k_token=max(k, voyager["k_token"]),
                                              batch_size=voyager["query_batch_size"])
    return {qid: [(str(hit["id"]), float(hit["score"])) for hit in hits] for qid, hits in zip(qids, results)}


def rerank(model_ref: str, queries: Mapping[str, str], candidates: Mapping[str, Sequence[str]],
           corpus: Mapping[str, dict], config: Mapping) -> dict:
    """Rescore each query's candidate documents (e.g. BM25's top k) with MaxSim through ``pylate.rank.rerank``:
    ``{qid: [(doc_id, score), ...]}``, best first. Each candidate document is encoded once."""
    from pylate.rank import rerank as pylate_rerank

    missing = sorted({d for docs in candidates.values() for d in docs} - set(corpus))
    if missing:
        raise ValueError(f"rerank: {len(missing)} candidate document(s) not in the corpus, e.g. {missing[:3]}")
    unknown = sorted(set(candidates) - set(queries))
    if unknown:
        raise ValueError(f"rerank: candidates for unknown queries, e.g. {unknown[:3]}")
    model = load(model_ref, config)
    qids = [q for q in candidates if candidates[q]]
    unique = list(dict.fromkeys(d for q in qids for d in candidates[q]))
    batch_size = _batch_size(config)
    doc_vectors = dict(zip(unique, model.encode([doc_text(corpus[d]) for d in unique], is_query=False,
                                                batch_size=batch_size)))
    query_vectors = model.encode([queries[q] for q in qids], is_query=True, batch_size=batch_size)
    ranked = pylate_rerank(documents_ids=[list(candidates[q]) for q in qids], queries_embeddings=query_vectors,
                           documents_embeddings=[[doc_vectors[d] for d in candidates[q]] for q in qids])
    run = {qid: [(str(hit["id"]), float(hit["score"])) for hit in hits] for qid, hits in zip(qids, ranked)}
    return {**{q: [] for q in candidates}, **run}
