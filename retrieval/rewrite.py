"""Rewrite the last turn of a conversation into a standalone search query with an LLM.

Any OpenAI-compatible chat-completions endpoint works (a local vLLM server, an OpenAI-style API). Answers are
cached in a JSONL file keyed by a hash of everything that determines them (model, prompt messages,
temperature), so a re-run of a stage, or a second stage formatting the same queries, never calls the network
again; each new answer is appended and flushed at once, so an interrupted run keeps what it paid for.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

SYSTEM_PROMPT = (
    "You rewrite the last user turn of a conversation into one standalone search query. "
    "Resolve pronouns and references from the conversation, keep the user's intent and key terms, "
    "and add nothing else. Reply with the query only."
)
BACKOFF_SECONDS = 1.0  # first wait before a retry; doubled each time
_RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
_THINKING = re.compile(r"^\s*<think>.*?</think>", re.DOTALL)  # reasoning models served without a reasoning parser


class RewriteError(RuntimeError):
    """The endpoint failed or answered something that is not a usable chat completion."""


class ChatClient:
    """One OpenAI-compatible chat-completions endpoint: POST with retries, the answer's text back (reasoning
    blocks and surrounding quotes removed). Shared by the rewriter and the synthetic-query generator."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, temperature: float = 0.0,
                 timeout: float = 60.0, max_retries: int = 3):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.temperature = model, api_key, temperature
        self.timeout, self.max_retries = timeout, max(0, max_retries)
        self._opener = urllib.request.build_opener()  # proxy settings read now, from the environment

    def request(self, messages: list[dict], **extra) -> dict:
        """The request body for ``messages``; ``extra`` (e.g. ``seed``, ``max_tokens``) is sent as is."""
        return {"model": self.model, "messages": messages, "temperature": self.temperature, **extra}

    def complete(self, request: dict) -> str:
        """POST one chat completion, retrying connection failures and transient HTTP statuses."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        body = json.dumps(request).encode()
        for attempt in range(self.max_retries + 1):
            try:
                http_request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with self._opener.open(http_request, timeout=self.timeout) as response:
                    raw = response.read()
                break
            except urllib.error.HTTPError as err:
                detail = err.read().decode("utf-8", "replace")[:500]
                failure = f"POST {self.url} failed: HTTP {err.code} {err.reason}: {detail}"
                if err.code not in _RETRYABLE_STATUS:
                    raise RewriteError(failure) from err
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                failure = f"POST {self.url} failed: {getattr(err, 'reason', err)}"
            if attempt == self.max_retries:
                raise RewriteError(f"{failure} (after {attempt + 1} attempts)")
            time.sleep(BACKOFF_SECONDS * 2**attempt)
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise RewriteError(f"{self.url} did not answer a chat completion ({err!r}): {raw[:500]!r}") from err
        rewrite = _THINKING.sub("", content or "").strip().strip('"').strip()
        if not rewrite:
            raise RewriteError(f"{self.url} answered an empty completion: {raw[:500]!r}")
        return rewrite


class Rewriter(ChatClient):
    def __init__(
        self,
        base_url: str,
        model: str,
        cache_path: str | os.PathLike,
        *,
        api_key: str | None = None,
        temperature: float = 0.0,
        timeout: float = 60.0,
        max_retries: int = 3,
    ):
        super().__init__(base_url, model, api_key=api_key, temperature=temperature, timeout=timeout,
                         max_retries=max_retries)
        self.cache_path = Path(cache_path)
        self.cache: dict[str, str] = load_cache(self.cache_path)

    def messages(self, history: list[dict], last_turn: str) -> list[dict]:
        transcript = "\n".join(f"{turn['speaker']}: {turn['text']}" for turn in history)
        user = f"Conversation:\n{transcript}\n\nLast user turn: {last_turn}\n\nStandalone search query:"
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]

    def rewrite(self, query_id: str, history: list[dict], last_turn: str) -> str:
        request = self.request(self.messages(history, last_turn))
        key = cache_key(request)
        if key in self.cache:
            return self.cache[key]
        try:
            rewrite = self.complete(request)
        except RewriteError as err:
            raise RewriteError(f"rewriting query {query_id!r}: {err}") from err
        self.cache[key] = rewrite
        append_cache_entry(self.cache_path, {"key": key, "query_id": query_id, "model": self.model,
                                             "last_turn": last_turn, "rewrite": rewrite})
        return rewrite

def cache_key(request: dict) -> str:
    """Everything that determines an answer (model, messages, sampling settings), hashed."""
    return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def append_cache_entry(path: Path, entry: dict) -> None:
    """Append one answer and flush it to disk at once, so an interrupted run keeps what it paid for."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(entry, ensure_ascii=False) + "\n")
        out.flush()
        os.fsync(out.fileno())


def load_cache(path: Path, field: str = "rewrite") -> dict:
    """Read key -> entry[field]; a torn last line (a crash mid-append) is cut off so later appends stay whole."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    complete_end = data.rfind(b"\n") + 1
    tail = data[complete_end:]
    if tail.strip():
        try:
            json.loads(tail)
            with open(path, "ab") as out:  # a whole record that just lacks its newline
                out.write(b"\n")
            complete_end = len(data)
        except ValueError:
            warnings.warn(f"{path}: dropping a truncated last line ({len(tail)} bytes)")
            with open(path, "r+b") as out:
                out.truncate(complete_end)
    cache = {}
    for number, line in enumerate(data[:complete_end].decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            cache[entry["key"]] = entry[field]
        except (ValueError, KeyError, TypeError) as err:
            raise RewriteError(f"{path}:{number}: not a cache entry ({err!r}); fix or delete the line")
    return cache
