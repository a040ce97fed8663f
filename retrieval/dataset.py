"""Read, validate and write datasets in BEIR layout.

    <folder>/corpus.jsonl       {"_id", "title"?, "text"} per line
    <folder>/queries.jsonl      {"_id", "text", ...} per line (extra fields, e.g. conversation ones, are kept)
    <folder>/qrels/<split>.tsv  header "query-id<TAB>corpus-id<TAB>score", one judgment per row

Every problem is a DataError naming the file, the 1-based line and the reason, so a bad record can be found
and fixed without guessing.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from retrieval.io import atomic_dir, atomic_path, write_jsonl

QRELS_HEADER = ("query-id", "corpus-id", "score")
_INTEGER = re.compile(r"[+-]?\d+")


class DataError(ValueError):
    """A problem in a dataset file; ``str(err)`` is ``"<path>:<line>: <reason>"`` (no line when not about one)."""

    def __init__(self, path: str | os.PathLike, reason: str, line: int | None = None):
        self.path, self.reason, self.line = str(path), reason, line
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {reason}")


@dataclass
class Dataset:
    corpus: dict[str, dict]  # doc_id -> {"title": str, "text": str}, in file order
    queries: dict[str, dict]  # query_id -> the JSON record minus "_id"
    qrels: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # split -> qid -> doc_id -> grade


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, decoded line without its end) for non-blank lines.

    Bytes are decoded line by line so that an encoding error can name its line.
    """
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(path, f"not valid UTF-8 (byte {err.start}: {raw[err.start:err.start + 1]!r})", number)
            line = line.rstrip("\r\n")
            if line.strip():
                yield number, line


def _read_records(path: str | os.PathLike, what: str) -> dict[str, tuple[int, dict]]:
    """Read a BEIR JSONL file into id -> (line, record minus "_id"), checking the fields all files share."""
    path = Path(path)
    records: dict[str, tuple[int, dict]] = {}
    for number, line in _lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(path, f"not valid JSON ({err.msg} at column {err.colno})", number)
        if not isinstance(record, dict):
            raise DataError(path, f"expected a JSON object, got {type(record).__name__}", number)
        record_id = record.pop("_id", None)
        if not isinstance(record_id, str):
            raise DataError(path, 'missing "_id"' if record_id is None else '"_id" is not a string', number)
        if not record_id:
            raise DataError(path, 'empty "_id"', number)
        if not isinstance(record.get("text"), str):
            raise DataError(path, 'missing "text"' if "text" not in record else '"text" is not a string', number)
        if record_id in records:
            raise DataError(path, f"duplicate id {record_id!r} (first on line {records[record_id][0]})", number)
        records[record_id] = (number, record)
    if not records:
        raise DataError(path, f"empty {what} (no records)")
    return records


def read_corpus(path: str | os.PathLike) -> dict[str, dict]:
    corpus = {}
    for doc_id, (number, record) in _read_records(path, "corpus").items():
        title = record.get("title", "")
        if title is None:  # some BEIR exports write null for a missing title
            title = ""
        if not isinstance(title, str):
            raise DataError(path, '"title" is not a string', number)
        corpus[doc_id] = {"title": title, "text": record["text"]}
    return corpus


def read_queries(path: str | os.PathLike) -> dict[str, dict]:
    return {query_id: record for query_id, (_, record) in _read_records(path, "query set").items()}


def read_qrels(path: str | os.PathLike, corpus_ids=None, query_ids=None) -> dict[str, dict[str, int]]:
    """Read one BEIR qrels TSV; ids are checked against ``corpus_ids`` / ``query_ids`` when given."""
    path = Path(path)
    qrels: dict[str, dict[str, int]] = {}
    first_seen: dict[tuple[str, str], int] = {}
    header_seen = False
    for number, line in _lines(path):
        columns = line.split("\t")
        if not header_seen:
            if tuple(columns) != QRELS_HEADER:
                raise DataError(path, f"expected header {'<TAB>'.join(QRELS_HEADER)!r}, got {line!r}", number)
            header_seen = True
            continue
        if len(columns) != 3:
            raise DataError(path, f"expected 3 tab-separated columns, got {len(columns)}", number)
        query_id, doc_id, score = columns
        if not query_id or not doc_id:
            raise DataError(path, "empty query id" if not query_id else "empty corpus id", number)
        if not _INTEGER.fullmatch(score.strip()):
            raise DataError(path, f"score {score!r} is not an integer", number)
        if query_ids is not None and query_id not in query_ids:
            raise DataError(path, f"unknown query id {query_id!r} (not in queries)", number)
        if corpus_ids is not None and doc_id not in corpus_ids:
            raise DataError(path, f"unknown corpus id {doc_id!r} (not in corpus)", number)
        if (query_id, doc_id) in first_seen:
            raise DataError(
                path, f"duplicate pair ({query_id!r}, {doc_id!r}) (first on line {first_seen[query_id, doc_id]})", number
            )
        first_seen[query_id, doc_id] = number
        qrels.setdefault(query_id, {})[doc_id] = int(score)
    if not header_seen:
        raise DataError(path, "empty qrels file (no header)")
    if not qrels:
        raise DataError(path, "qrels file has no rows")
    return qrels


def load_beir(folder: str | os.PathLike) -> Dataset:
    """Read and validate a whole BEIR folder, cross-checking qrels ids against corpus and queries."""
    folder = Path(folder)
    for required in (folder / "corpus.jsonl", folder / "queries.jsonl", folder / "qrels"):
        if not required.exists():
            raise DataError(required, "missing (expected BEIR layout: corpus.jsonl, queries.jsonl, qrels/*.tsv)")
    qrels_files = sorted((folder / "qrels").glob("*.tsv"))
    if not qrels_files:
        raise DataError(folder / "qrels", "no qrels files (*.tsv)")
    corpus = read_corpus(folder / "corpus.jsonl")
    queries = read_queries(folder / "queries.jsonl")
    qrels = {file.stem: read_qrels(file, corpus_ids=corpus, query_ids=queries) for file in qrels_files}
    return Dataset(corpus=corpus, queries=queries, qrels=qrels)


def write_qrels(qrels: dict[str, dict[str, int]], path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as out:
        out.write("\t".join(QRELS_HEADER) + "\n")
        for query_id, docs in qrels.items():
            for doc_id, grade in docs.items():
                out.write(f"{query_id}\t{doc_id}\t{int(grade)}\n")


def write_beir(dataset: Dataset, folder: str | os.PathLike) -> None:
    """Write ``dataset`` in BEIR layout; the folder appears (or is replaced) only once complete."""
    with atomic_dir(folder) as tmp:
        write_jsonl(({"_id": doc_id, **doc} for doc_id, doc in dataset.corpus.items()), tmp / "corpus.jsonl")
        write_jsonl(({"_id": query_id, **query} for query_id, query in dataset.queries.items()), tmp / "queries.jsonl")
        for split, split_qrels in dataset.qrels.items():
            write_qrels(split_qrels, tmp / "qrels" / f"{split}.tsv")


def doc_text(doc: dict) -> str:
    """Title and text as one string, BEIR's "flat" convention (just the text when there is no title)."""
    return f"{doc.get('title') or ''} {doc['text']}".strip()
