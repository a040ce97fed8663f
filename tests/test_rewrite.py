"""The Rewriter against a chat-completions server on 127.0.0.1 started here; no other network is used."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import retrieval.rewrite
from retrieval.query_format import format_queries
from retrieval.rewrite import Rewriter, RewriteError

HISTORY = [
    {"speaker": "user", "text": "does IBM offer document databases?"},
    {"speaker": "agent", "text": "Yes, Cloudant stores JSON documents."},
]


class ChatServer(ThreadingHTTPServer):
    """Answers POST /v1/chat/completions with "rewritten: <last line of the user message>"."""

    def __init__(self, handler=None):
        super().__init__(("127.0.0.1", 0), handler or ChatHandler)
        self.requests: list[dict] = []
        self.status = 200  # set to e.g. 500 to fail every request
        self.body: bytes | None = None  # set to answer raw bytes instead of a completion

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class ChatHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **request})
        last_turn = request["messages"][-1]["content"].split("Last user turn: ")[1].split("\n")[0]
        completion = {"choices": [{"message": {"role": "assistant", "content": f' "rewritten: {last_turn}"\n'}}]}
        body = self.server.body if self.server.body is not None else json.dumps(completion).encode()
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture
def server(monkeypatch):
    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)  # the local server must be reached directly
    monkeypatch.setattr(retrieval.rewrite, "BACKOFF_SECONDS", 0.0)
    chat_server = ChatServer()
    thread = threading.Thread(target=chat_server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield chat_server
    chat_server.shutdown()
    chat_server.server_close()


def test_rewrites_and_caches_on_disk(server, tmp_path):
    cache = tmp_path / "cache" / "rewrites.jsonl"
    rewriter = Rewriter(server.base_url + "/", "test-model", cache, api_key="secret")
    assert rewriter.rewrite("q2", HISTORY, "can it store any JSON?") == "rewritten: can it store any JSON?"
    assert len(server.requests) == 1
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer secret"
    assert request["model"] == "test-model" and request["temperature"] == 0.0
    assert [m["role"] for m in request["messages"]] == ["system", "user"]
    assert "agent: Yes, Cloudant stores JSON documents." in request["messages"][1]["content"]

    # Same question again, in this instance or a new one on the same file: answered from the cache.
    assert rewriter.rewrite("q2", HISTORY, "can it store any JSON?") == "rewritten: can it store any JSON?"
    again = Rewriter(server.base_url, "test-model", cache)
    assert again.rewrite("q2-copy", HISTORY, "can it store any JSON?") == "rewritten: can it store any JSON?"
    assert len(server.requests) == 1
    # A different last turn, model or temperature is a new question.
    assert again.rewrite("q3", HISTORY, "and attachments?") == "rewritten: and attachments?"
    Rewriter(server.base_url, "other-model", cache).rewrite("q3", HISTORY, "and attachments?")
    Rewriter(server.base_url, "test-model", cache, temperature=0.7).rewrite("q3", HISTORY, "and attachments?")
    assert len(server.requests) == 4
    assert len(cache.read_text().splitlines()) == 4


def test_tolerates_a_truncated_last_cache_line(server, tmp_path):
    cache = tmp_path / "rewrites.jsonl"
    Rewriter(server.base_url, "m", cache).rewrite("q2", HISTORY, "first?")
    with open(cache, "a") as out:
        out.write('{"key": "abc", "rewr')  # a crash mid-append
    with pytest.warns(UserWarning, match="truncated last line"):
        rewriter = Rewriter(server.base_url, "m", cache)
    assert rewriter.rewrite("q2", HISTORY, "first?") == "rewritten: first?"
    assert len(server.requests) == 1
    rewriter.rewrite("q3", HISTORY, "second?")
    assert [json.loads(line)["query_id"] for line in cache.read_text().splitlines()] == ["q2", "q3"]


def test_http_error_is_clear_and_retried(server, tmp_path):
    server.status = 500
    rewriter = Rewriter(server.base_url, "m", tmp_path / "rewrites.jsonl", max_retries=2)
    with pytest.raises(RewriteError, match=r"query 'q2'.*POST http://127\.0\.0\.1:\d+/v1/chat/completions.*HTTP 500"):
        rewriter.rewrite("q2", HISTORY, "first?")
    assert len(server.requests) == 3  # one attempt and two retries
    assert not (tmp_path / "rewrites.jsonl").exists()  # failures are not cached


def test_client_error_is_not_retried(server, tmp_path):
    server.status = 404
    with pytest.raises(RewriteError, match="HTTP 404"):
        Rewriter(server.base_url, "m", tmp_path / "c.jsonl").rewrite("q2", HISTORY, "first?")
    assert len(server.requests) == 1


def test_bad_json_names_the_url(server, tmp_path):
    server.body = b"<html>not json</html>"
    with pytest.raises(RewriteError, match=r"/v1/chat/completions did not answer a chat completion"):
        Rewriter(server.base_url, "m", tmp_path / "c.jsonl").rewrite("q2", HISTORY, "first?")


def test_format_queries_with_a_rewriter(server, tmp_path):
    queries = {
        "c-1": {"text": "does IBM offer document databases?", "conversation_id": "c", "turn": 1, "history": []},
        "c-2": {"text": "can it store any JSON?", "conversation_id": "c", "turn": 2, "history": HISTORY},
    }
    rewriter = Rewriter(server.base_url, "m", tmp_path / "c.jsonl")
    assert format_queries(queries, "rewrite", rewriter=rewriter) == {
        "c-1": "does IBM offer document databases?",
        "c-2": "rewritten: can it store any JSON?",
    }
    assert len(server.requests) == 1
