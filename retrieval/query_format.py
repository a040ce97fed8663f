"""How a (possibly multi-turn) query is put to the retriever; one function shared by every stage.

Formats:
    last_turn     the current user turn as typed (``record["text"]``).
    full_history  every earlier user and agent turn, then the current turn, newest last, one turn per line as
                  ``"user: ..."`` / ``"agent: ..."``.
    last_k        the last k user turns (earlier ones and the current), newest last, one per line.
    rewrite       a standalone rewrite: the record's ``"rewrite"`` field, else one asked of a ``Rewriter``.

Why newline-joined, speaker-prefixed lines rather than e.g. " [SEP] ": a separator token is tokenizer-specific
(BM25 or a non-BERT encoder would see the literal text "[SEP]"), whereas every tokenizer treats a newline as
whitespace, and the plain-word prefixes let the model tell the user's questions from the agent's answers.
A query whose output is a single turn (no history, or all of it truncated away) is its plain text, so the first
turn of a conversation reads exactly as in ``last_turn``.

``max_tokens`` applies to the multi-turn formats (full_history, last_k): whole turns are dropped from the
oldest until the joined text fits; the current turn is always kept, cut at its end only if it alone is too long.
Queries without history (e.g. ordinary BEIR queries) are their ``"text"`` in every format.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from retrieval.rewrite import Rewriter

FORMATS = ("last_turn", "full_history", "last_k", "rewrite")
_WORD = re.compile(r"\S+")


def count_words(text: str) -> int:
    """Default token counter: whitespace-separated words."""
    return len(text.split())


def format_queries(
    queries: dict[str, dict],
    fmt: str = "last_turn",
    *,
    last_k: int = 3,
    max_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
    rewriter: Rewriter | None = None,
) -> dict[str, str]:
    """Return query_id -> the text to retrieve with, in the order of ``queries``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown query format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if last_k < 1:
        raise ValueError(f"last_k must be at least 1, got {last_k}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    count = count_tokens or count_words
    formatted = {}
    for query_id, record in queries.items():
        text, history = record["text"], _history(query_id, record)
        if fmt == "full_history" and history:
            turns = [f"{turn['speaker']}: {turn['text']}" for turn in history] + [f"user: {text}"]
            formatted[query_id] = _fit(turns, text, max_tokens, count)
        elif fmt == "last_k" and history:
            user_turns = [turn["text"] for turn in history if turn["speaker"] == "user"] + [text]
            formatted[query_id] = _fit(user_turns[-last_k:], text, max_tokens, count)
        elif fmt == "rewrite":
            formatted[query_id] = _rewrite(query_id, record, history, rewriter)
        else:
            formatted[query_id] = text
    return formatted


def _history(query_id: str, record: dict) -> list[dict]:
    """The record's earlier turns (empty when it has none), checked so a malformed one names its query."""
    history = record.get("history") or []
    if not isinstance(history, list) or not all(
        isinstance(turn, dict) and isinstance(turn.get("text"), str) and isinstance(turn.get("speaker"), str)
        for turn in history
    ):
        raise ValueError(f"query {query_id!r}: \"history\" must be a list of {{'speaker': str, 'text': str}}")
    return history


def _fit(turns: list[str], current_text: str, max_tokens: int | None, count: Callable[[str], int]) -> str:
    """Join the newest turns that fit ``max_tokens`` (``turns[-1]`` is the current turn, always kept).

    Counting is done on the joined text, since that is what the retriever's tokenizer sees.
    """
    kept = 1
    while kept < len(turns) and (max_tokens is None or count("\n".join(turns[-(kept + 1):])) <= max_tokens):
        kept += 1
    if kept == 1:  # a single turn is put as plain text, without its speaker prefix
        return current_text if max_tokens is None else _cut_end(current_text, max_tokens, count)
    return "\n".join(turns[-kept:])


def _cut_end(text: str, max_tokens: int, count: Callable[[str], int]) -> str:
    """The longest word prefix of ``text`` that fits (at least one word, so a query is never empty)."""
    if count(text) <= max_tokens:
        return text
    ends = [match.end() for match in _WORD.finditer(text)]
    low, high = 1, len(ends)  # binary search: largest number of words whose prefix fits
    while low < high:
        middle = (low + high + 1) // 2
        if count(text[: ends[middle - 1]]) <= max_tokens:
            low = middle
        else:
            high = middle - 1
    return text[: ends[low - 1]] if ends else text


def _rewrite(query_id: str, record: dict, history: list[dict], rewriter: Rewriter | None) -> str:
    rewrite = record.get("rewrite")
    if isinstance(rewrite, str) and rewrite.strip():
        return rewrite
    if not history:  # a first or standalone turn has nothing to resolve: no LLM call needed
        return record["text"]
    if rewriter is None:
        raise ValueError(
            f"query {query_id!r} has no \"rewrite\" field and no rewriter is configured; "
            "configure an LLM rewriter (retrieval.rewrite.Rewriter) or use another query format"
        )
    return rewriter.rewrite(query_id, history, record["text"])
