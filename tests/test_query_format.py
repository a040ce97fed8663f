import pytest

from retrieval.query_format import FORMATS, format_queries

# One conversation of 4 user turns; "c-4" is the current (4th) turn with all earlier turns as history.
HISTORY = [
    {"speaker": "user", "text": "does IBM offer document databases?"},
    {"speaker": "agent", "text": "Yes, Cloudant stores JSON documents."},
    {"speaker": "user", "text": "can it store any JSON?"},
    {"speaker": "agent", "text": "Yes, with an _id field."},
    {"speaker": "user", "text": "what about attachments?"},
    {"speaker": "agent", "text": "Attachments are stored beside the document."},
]
CURRENT = "how large can they be?"
REWRITE = "What is the maximum size of a Cloudant attachment?"


def conversation(with_rewrite=True):
    queries = {
        f"c-{turn}": {"text": HISTORY[2 * turn - 2]["text"] if turn < 4 else CURRENT, "conversation_id": "c",
                      "turn": turn, "history": HISTORY[: 2 * turn - 2]}
        for turn in range(1, 5)
    }
    if with_rewrite:
        queries["c-4"]["rewrite"] = REWRITE
    return queries


class FakeRewriter:
    def __init__(self):
        self.calls = []

    def rewrite(self, query_id, history, last_turn):
        self.calls.append((query_id, len(history), last_turn))
        return f"standalone: {last_turn}"


def test_last_turn():
    assert format_queries(conversation())["c-4"] == CURRENT
    assert format_queries(conversation(), "last_turn")["c-2"] == "can it store any JSON?"


def test_full_history():
    assert format_queries(conversation(), "full_history")["c-4"] == (
        "user: does IBM offer document databases?\n"
        "agent: Yes, Cloudant stores JSON documents.\n"
        "user: can it store any JSON?\n"
        "agent: Yes, with an _id field.\n"
        "user: what about attachments?\n"
        "agent: Attachments are stored beside the document.\n"
        "user: how large can they be?"
    )
    # A first turn has no history: plain text, as in last_turn.
    assert format_queries(conversation(), "full_history")["c-1"] == "does IBM offer document databases?"


def test_full_history_truncates_oldest_turns():
    # Words: "user: what about attachments?" 4, "agent: Attachments are ... document." 7, current with prefix 6.
    formatted = format_queries(conversation(), "full_history", max_tokens=17)["c-4"]
    assert formatted == (
        "user: what about attachments?\nagent: Attachments are stored beside the document.\nuser: how large can they be?"
    )
    assert format_queries(conversation(), "full_history", max_tokens=16)["c-4"] == (
        "agent: Attachments are stored beside the document.\nuser: how large can they be?"
    )
    # Not even one earlier turn fits: the current turn alone, plain.
    assert format_queries(conversation(), "full_history", max_tokens=12)["c-4"] == CURRENT
    # The current turn alone is too long: cut at its end.
    assert format_queries(conversation(), "full_history", max_tokens=3)["c-4"] == "how large can"


def test_full_history_uses_the_given_token_counter():
    count_chars = len  # any monotone counter, e.g. a tokenizer's
    formatted = format_queries(conversation(), "full_history", max_tokens=100, count_tokens=count_chars)["c-4"]
    assert formatted == "agent: Attachments are stored beside the document.\nuser: how large can they be?"
    assert format_queries(conversation(), "full_history", max_tokens=10, count_tokens=count_chars)["c-4"] == "how large"


def test_last_k():
    assert format_queries(conversation(), "last_k", last_k=3)["c-4"] == (
        "can it store any JSON?\nwhat about attachments?\nhow large can they be?"
    )
    assert format_queries(conversation(), "last_k", last_k=10)["c-4"] == (
        "does IBM offer document databases?\ncan it store any JSON?\nwhat about attachments?\nhow large can they be?"
    )
    assert format_queries(conversation(), "last_k", last_k=1)["c-4"] == CURRENT
    assert format_queries(conversation(), "last_k", last_k=3)["c-2"] == (
        "does IBM offer document databases?\ncan it store any JSON?"
    )
    # The token budget drops the oldest user turns here too.
    assert format_queries(conversation(), "last_k", last_k=3, max_tokens=8)["c-4"] == (
        "what about attachments?\nhow large can they be?"
    )


def test_rewrite_field_is_used_when_present():
    rewriter = FakeRewriter()
    assert format_queries(conversation(), "rewrite", rewriter=rewriter)["c-4"] == REWRITE
    # only the turns without a rewrite field are asked for one (c-1 has no history to resolve)
    assert rewriter.calls == [("c-2", 2, "can it store any JSON?"), ("c-3", 4, "what about attachments?")]


def test_rewriter_is_asked_when_the_field_is_absent():
    rewriter = FakeRewriter()
    formatted = format_queries(conversation(with_rewrite=False), "rewrite", rewriter=rewriter)
    assert formatted["c-4"] == f"standalone: {CURRENT}"
    assert formatted["c-1"] == "does IBM offer document databases?"  # nothing to resolve: no LLM call
    assert rewriter.calls == [("c-2", 2, "can it store any JSON?"), ("c-3", 4, "what about attachments?"),
                              ("c-4", 6, CURRENT)]


def test_rewrite_without_field_or_rewriter_is_a_clear_error():
    queries = conversation(with_rewrite=False)
    queries["c-4"]["rewrite"] = "  "  # blank counts as absent
    with pytest.raises(ValueError, match=r"query 'c-2'.*configure an LLM rewriter"):
        format_queries(queries, "rewrite")


def test_plain_queries_are_their_text_in_every_format():
    queries = {"q1": {"text": "what is BM25?"}}
    for fmt in FORMATS:
        assert format_queries(queries, fmt, max_tokens=50) == {"q1": "what is BM25?"}


def test_bad_arguments():
    with pytest.raises(ValueError, match="last_turn, full_history, last_k, rewrite"):
        format_queries(conversation(), "everything")
    with pytest.raises(ValueError, match="last_k"):
        format_queries(conversation(), "last_k", last_k=0)
    with pytest.raises(ValueError, match=r"query 'x'.*history"):
        format_queries({"x": {"text": "t", "history": [{"speaker": "user"}]}}, "full_history")
