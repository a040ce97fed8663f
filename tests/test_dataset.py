import json
from pathlib import Path

import pytest

from retrieval.dataset import (
    DataError, Dataset, doc_text, load_beir, read_corpus, read_qrels, read_queries, write_beir, write_qrels,
)

CORPUS = [
    {"_id": "d1", "title": "Cats", "text": "Cats purr."},
    {"_id": "d2", "text": "Dogs bark."},
    {"_id": "d3", "title": "", "text": "Fish swim."},
]
QUERIES = [
    {"_id": "q1", "text": "what purrs", "conversation_id": "c1", "turn": 1, "history": []},
    {"_id": "q2", "text": "and barks?", "conversation_id": "c1", "turn": 2,
     "history": [{"speaker": "user", "text": "what purrs"}], "rewrite": "what barks", "extra": 7},
]
QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t2\nq2\td3\t0\n"


def jsonl(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def make_beir(folder: Path, corpus=None, queries=None, qrels=None) -> Path:
    """Write a BEIR folder; each part is records (list) or raw text/bytes, qrels a {split: content} dict."""
    (folder / "qrels").mkdir(parents=True)
    for name, content in (("corpus.jsonl", corpus or CORPUS), ("queries.jsonl", queries or QUERIES)):
        write_raw(folder / name, jsonl(content) if isinstance(content, list) else content)
    for split, content in (qrels or {"test": QRELS}).items():
        write_raw(folder / "qrels" / f"{split}.tsv", content)
    return folder


def write_raw(path: Path, content) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def error(func, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        func(*args, **kwargs)
    return str(info.value)


def test_load_beir_reads_all_parts(tmp_path):
    dataset = load_beir(make_beir(tmp_path / "ds", qrels={"test": QRELS, "train": "query-id\tcorpus-id\tscore\nq1\td2\t1\n"}))
    assert list(dataset.corpus) == ["d1", "d2", "d3"]
    assert dataset.corpus["d2"] == {"title": "", "text": "Dogs bark."}
    assert dataset.queries["q2"] == {k: v for k, v in QUERIES[1].items() if k != "_id"}
    assert dataset.qrels == {"test": {"q1": {"d1": 1}, "q2": {"d2": 2, "d3": 0}}, "train": {"q1": {"d2": 1}}}


def test_blank_lines_and_crlf_are_tolerated(tmp_path):
    corpus = write_raw(tmp_path / "c.jsonl", "\n" + jsonl(CORPUS[:1]).replace("\n", "\r\n") + "  \n\n")
    assert read_corpus(corpus) == {"d1": {"title": "Cats", "text": "Cats purr."}}
    qrels = write_raw(tmp_path / "q.tsv", "query-id\tcorpus-id\tscore\r\nq1\td1\t1\r\n\r\n")
    assert read_qrels(qrels) == {"q1": {"d1": 1}}


def test_write_beir_round_trips(tmp_path):
    dataset = load_beir(make_beir(tmp_path / "src"))
    write_beir(dataset, tmp_path / "out")
    assert load_beir(tmp_path / "out") == dataset
    assert (tmp_path / "out" / "qrels" / "test.tsv").read_text().startswith("query-id\tcorpus-id\tscore\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temp leftovers
    write_beir(Dataset(corpus={"x": {"title": "", "text": "t"}}, queries=dataset.queries, qrels={}), tmp_path / "out")
    assert (tmp_path / "out" / "corpus.jsonl").read_text().count("\n") == 1  # replaced, not merged


def test_write_qrels(tmp_path):
    write_qrels({"q1": {"d1": 1, "d2": 0}}, tmp_path / "qrels" / "dev.tsv")
    assert (tmp_path / "qrels" / "dev.tsv").read_text() == "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t0\n"


def test_doc_text():
    assert doc_text({"title": "Cats", "text": "Cats purr. "}) == "Cats Cats purr."
    assert doc_text({"title": "", "text": " Dogs bark."}) == "Dogs bark."
    assert doc_text({"text": "Fish."}) == "Fish."


@pytest.mark.parametrize("content, line, reason", [
    ('{"_id": "d1", "text": "a"}\n{"_id": "d2", "text": \n', 2, "not valid JSON"),
    ('{"_id": "d1", "text": "a"}\n\n["d2", "b"]\n', 3, "expected a JSON object, got list"),
    ('{"text": "a"}\n', 1, 'missing "_id"'),
    ('{"_id": 5, "text": "a"}\n', 1, '"_id" is not a string'),
    ('{"_id": "", "text": "a"}\n', 1, 'empty "_id"'),
    ('{"_id": "d1"}\n', 1, 'missing "text"'),
    ('{"_id": "d1", "text": ["a"]}\n', 1, '"text" is not a string'),
    ('{"_id": "d1", "title": 3, "text": "a"}\n', 1, '"title" is not a string'),
    ('{"_id": "d1", "text": "a"}\n{"_id": "d2", "text": "b"}\n{"_id": "d1", "text": "c"}\n', 3,
     "duplicate id 'd1' (first on line 1)"),
    (b'{"_id": "d1", "text": "a"}\n{"_id": "d2", "text": "caf\xe9"}\n', 2, "not valid UTF-8"),
])
def test_bad_corpus_lines(tmp_path, content, line, reason):
    path = write_raw(tmp_path / "corpus.jsonl", content)
    message = error(read_corpus, path)
    assert message.startswith(f"{path}:{line}: ")
    assert reason in message


@pytest.mark.parametrize("reader, what", [(read_corpus, "empty corpus"), (read_queries, "empty query set")])
def test_empty_files(tmp_path, reader, what):
    path = write_raw(tmp_path / "x.jsonl", "\n \n")
    assert error(reader, path) == f"{path}: {what} (no records)"


def test_bad_query_line(tmp_path):
    path = write_raw(tmp_path / "queries.jsonl", '{"_id": "q1", "text": "a"}\n{"_id": "q2", "turn": 2}\n')
    assert error(read_queries, path) == f'{path}:2: missing "text"'


@pytest.mark.parametrize("content, line, reason", [
    ("query-id\tdoc-id\tscore\nq1\td1\t1\n", 1, "expected header"),
    ("q1\td1\t1\n", 1, "expected header"),
    ("query-id\tcorpus-id\tscore\nq1\td1\n", 2, "expected 3 tab-separated columns, got 2"),
    ("query-id\tcorpus-id\tscore\nq1\td1\t1\t0\n", 2, "expected 3 tab-separated columns, got 4"),
    ("query-id\tcorpus-id\tscore\nq1 d1 1\n", 2, "expected 3 tab-separated columns, got 1"),
    ("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t0.5\n", 3, "score '0.5' is not an integer"),
    ("query-id\tcorpus-id\tscore\nq1\td1\thigh\n", 2, "score 'high' is not an integer"),
    ("query-id\tcorpus-id\tscore\nq9\td1\t1\n", 2, "unknown query id 'q9'"),
    ("query-id\tcorpus-id\tscore\nq1\td9\t1\n", 2, "unknown corpus id 'd9'"),
    ("query-id\tcorpus-id\tscore\n\td1\t1\n", 2, "empty query id"),
    ("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td1\t1\nq1\td1\t2\n", 4, "duplicate pair ('q1', 'd1') (first on line 2)"),
    (b"query-id\tcorpus-id\tscore\nq1\td\xff\t1\n", 2, "not valid UTF-8"),
])
def test_bad_qrels_lines(tmp_path, content, line, reason):
    path = write_raw(tmp_path / "test.tsv", content)
    message = error(read_qrels, path, corpus_ids={"d1", "d2"}, query_ids={"q1", "q2"})
    assert message.startswith(f"{path}:{line}: ")
    assert reason in message


@pytest.mark.parametrize("content, reason", [
    ("query-id\tcorpus-id\tscore\n\n", "qrels file has no rows"),
    ("", "empty qrels file (no header)"),
])
def test_qrels_without_rows(tmp_path, content, reason):
    path = write_raw(tmp_path / "test.tsv", content)
    assert error(read_qrels, path) == f"{path}: {reason}"


def test_load_beir_cross_checks_qrels_ids(tmp_path):
    folder = make_beir(tmp_path / "ds", qrels={"dev": "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\tzz\t1\n"})
    assert error(load_beir, folder) == f"{folder / 'qrels' / 'dev.tsv'}:3: unknown corpus id 'zz' (not in corpus)"


def test_load_beir_names_bad_file(tmp_path):
    folder = make_beir(tmp_path / "ds", queries='{"_id": "q1", "text": "a"}\n{"_id": "q1", "text": "b"}\n')
    assert error(load_beir, folder) == f"{folder / 'queries.jsonl'}:2: duplicate id 'q1' (first on line 1)"


def test_load_beir_missing_parts(tmp_path):
    folder = make_beir(tmp_path / "ds")
    (folder / "qrels" / "test.tsv").unlink()
    assert error(load_beir, folder) == f"{folder / 'qrels'}: no qrels files (*.tsv)"
    (folder / "corpus.jsonl").unlink()
    assert str(folder / "corpus.jsonl") + ": missing" in error(load_beir, folder)
