"""Convert IBM's MTRAG benchmark (github.com/IBM/mt-rag-benchmark) into BEIR layout with conversation fields.

What is read from a checkout (or the unzipped GitHub archive) of the repository, for one domain ``<d>``:

    corpora/passage_level/<d>.jsonl.zip          the passage-level corpus: a zip holding <d>.jsonl, one passage a
                                                 line {"_id", "id", "url", "text", "title"}
    mtrag-human/retrieval_tasks/<d>/
        <d>_lastturn.jsonl                       the retrieval tasks (answerable and partial turns only):
                                                 {"_id": "<conversation_id><::><turn>", "text": "|user|: <last turn>"}
        <d>_rewrite.jsonl                        the same ids, text "|user|: <human standalone rewrite>"
        qrels/dev.tsv                            "query-id<TAB>corpus-id<TAB>score", MTRAG's only split
    mtrag-human/generation_tasks/reference.jsonl one task per conversation turn (all domains, all turns):
                                                 {"conversation_id", "task_id" (= the retrieval _id), "turn",
                                                  "input": [{"speaker": "user"|"agent", "text", ...}, ...] (the
                                                  conversation so far, oldest first, ending with the user turn),
                                                  "Question Type", "Multi-Turn", "Answerability", "Collection", ...}

Older revisions of the repository keep the same files under ``human/`` instead of ``mtrag-human/`` and the corpus
as ``corpora/<d>.jsonl.zip``; both layouts are accepted. (``conversations.json`` carries no conversation or task
ids, so the per-turn conversation fields come from the generation tasks, which do.)

Output, per query (id and texts kept exactly as MTRAG has them, only the "|user|: " prefix removed):
``text`` (the last user turn), ``conversation_id``, ``turn`` (1-based int), ``history`` (the earlier turns,
``[{"speaker", "text"}]``, oldest first), ``rewrite``, and MTRAG's per-turn annotations as lists of labels, as
given: ``answerability`` (ANSWERABLE / PARTIAL / ...), ``question_type`` (Factoid, Explanation, ...) and
``multi_turn`` (Follow-up, Clarification, N/A). Qrels: MTRAG's dev qrels become split "test".
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from retrieval.dataset import Dataset, DataError, load_beir, read_qrels, write_beir
from retrieval.download import MIRROR_ENV, FetchError

DOMAINS = ("clapnq", "cloud", "fiqa", "govt")
MTRAG_REPO_URL = "https://github.com/IBM/mt-rag-benchmark/archive/refs/heads/main.zip"  # default branch: main
QRELS_SPLIT = "test"  # MTRAG's qrels/dev.tsv is its only (evaluation) split
HUMAN_DIRS = ("mtrag-human", "human")  # current layout first, then the one before the MTRAG-UN release
CORPUS_FILES = (
    "corpora/passage_level/{d}.jsonl.zip",
    "corpora/passage_level/{d}.jsonl",
    "corpora/{d}.jsonl.zip",
    "corpora/{d}.jsonl",
)
USER_PREFIX = "|user|:"
SPEAKERS = ("user", "agent")
# query field -> MTRAG's per-task annotation key (matched case-insensitively: MTRAG-UN files write "answerability")
ANNOTATIONS = {"answerability": "Answerability", "question_type": "Question Type", "multi_turn": "Multi-Turn"}
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def _offline_hint(domain: str) -> str:
    return (
        f"set {MIRROR_ENV} to a folder holding mtrag-{domain}/ in BEIR layout, or use source 'dir' with a local "
        f"folder in BEIR layout (convert_mtrag converts a local copy of the repository)"
    )


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown MTRAG domain {domain!r}; valid domains: {', '.join(DOMAINS)}")


# ---------------------------------------------------------------------------------------------- locating files


@dataclass(frozen=True)
class MtragFiles:
    corpus: Path
    lastturn: Path
    rewrite: Path
    qrels: Path
    tasks: Path  # generation_tasks/reference.jsonl


def find_repo_root(path: str | os.PathLike) -> Path:
    """The repository root: ``path`` itself, or its only sub-folder (an unzipped GitHub archive)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(path, "missing (expected a copy of the mt-rag-benchmark repository)")

    def looks_like_root(folder: Path) -> bool:
        return (folder / "corpora").is_dir() or any((folder / h).is_dir() for h in HUMAN_DIRS)

    if looks_like_root(path):
        return path
    children = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX"))]
    if len(children) == 1 and looks_like_root(children[0]):
        return children[0]
    raise DataError(path, f"not a copy of the mt-rag-benchmark repository (no corpora/ or {'/ or '.join(HUMAN_DIRS)}/)")


def mtrag_files(repo_dir: str | os.PathLike, domain: str) -> MtragFiles:
    """Locate the files of ``domain``; a DataError names what is missing and where it was looked for."""
    _check_domain(domain)
    root = find_repo_root(repo_dir)
    human = next((root / h for h in HUMAN_DIRS if (root / h / "retrieval_tasks" / domain).is_dir()), None)
    if human is None:
        tried = " or ".join(str(root / h / "retrieval_tasks" / domain) for h in HUMAN_DIRS)
        raise DataError(tried, f"missing: no retrieval tasks for domain {domain!r}")
    tasks_dir = human / "retrieval_tasks" / domain
    files = {
        "lastturn": tasks_dir / f"{domain}_lastturn.jsonl",
        "rewrite": tasks_dir / f"{domain}_rewrite.jsonl",
        "qrels": tasks_dir / "qrels" / "dev.tsv",
        "tasks": human / "generation_tasks" / "reference.jsonl",
    }
    for what, file in files.items():
        if not file.is_file():
            raise DataError(file, f"missing ({what} file of MTRAG domain {domain!r})")
    corpus = next((root / c.format(d=domain) for c in CORPUS_FILES if (root / c.format(d=domain)).is_file()), None)
    if corpus is None:
        tried = ", ".join(c.format(d=domain) for c in CORPUS_FILES)
        raise DataError(root / "corpora", f"missing corpus of MTRAG domain {domain!r} (looked for {tried})")
    return MtragFiles(corpus=corpus, **files)


# -------------------------------------------------------------------------------------------------- reading


def _numbered_lines(stream: Iterable[bytes], where: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line) for the non-blank lines of a binary stream."""
    for number, raw in enumerate(stream, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(where, f"not valid UTF-8 (byte {err.start})", number)
        line = line.rstrip("\r\n")
        if line.strip():
            yield number, line


def _json_objects(stream: Iterable[bytes], where: str) -> Iterator[tuple[int, dict]]:
    for number, line in _numbered_lines(stream, where):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(where, f"not valid JSON ({err.msg} at column {err.colno})", number)
        if not isinstance(record, dict):
            raise DataError(where, f"expected a JSON object, got {type(record).__name__}", number)
        yield number, record


def _string_field(record: dict, key: str, where: str, number: int, *, empty_ok: bool = True) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise DataError(where, f'missing "{key}"' if value is None else f'"{key}" is not a string', number)
    if not empty_ok and not value:
        raise DataError(where, f'empty "{key}"', number)
    return value


def _check_not_lfs(path: Path) -> None:
    with open(path, "rb") as f:
        if f.read(len(_LFS_POINTER)) == _LFS_POINTER:
            raise DataError(path, "is a Git LFS pointer, not the file itself (fetch it with git lfs pull)")


def read_mtrag_corpus(path: str | os.PathLike, domain: str) -> dict[str, dict]:
    """Passages of a corpus file (``<d>.jsonl.zip`` holding ``<d>.jsonl``, or the jsonl itself): id -> title/text."""
    path = Path(path)
    _check_not_lfs(path)
    if path.suffix != ".zip":
        with open(path, "rb") as f:
            return _read_passages(f, str(path))
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith(".jsonl") and not Path(n).name.startswith(".")
                     and not n.startswith("__MACOSX/")]
            exact = [n for n in names if Path(n).name == f"{domain}.jsonl"]
            if len(exact) == 1 or len(names) == 1:
                member = (exact or names)[0]
            else:
                found = ", ".join(names) or "no .jsonl file"
                raise DataError(path, f"expected one {domain}.jsonl in the archive, found: {found}")
            with zf.open(member) as f:
                return _read_passages(f, f"{path}!{member}")
    except zipfile.BadZipFile as err:
        raise DataError(path, f"not a valid zip archive ({err})") from err


def _read_passages(stream: Iterable[bytes], where: str) -> dict[str, dict]:
    corpus: dict[str, dict] = {}
    first_line: dict[str, int] = {}
    for number, record in _json_objects(stream, where):
        key = "_id" if "_id" in record else "id"  # MTRAG writes both, equal
        doc_id = _string_field(record, key, where, number, empty_ok=False)
        text = _string_field(record, "text", where, number)
        title = record.get("title")
        if title is None:
            title = ""
        if not isinstance(title, str):
            raise DataError(where, '"title" is not a string', number)
        if doc_id in corpus:
            raise DataError(where, f"duplicate passage id {doc_id!r} (first on line {first_line[doc_id]})", number)
        corpus[doc_id] = {"title": title, "text": text}
        first_line[doc_id] = number
    if not corpus:
        raise DataError(where, "empty corpus (no passages)")
    return corpus


def _strip_user(text: str) -> str:
    """MTRAG writes a retrieval query as "|user|: <text>"; return <text> exactly as typed."""
    if text.startswith(USER_PREFIX):
        text = text[len(USER_PREFIX):]
        if text.startswith(" "):
            text = text[1:]
    return text


def read_task_queries(path: str | os.PathLike) -> dict[str, tuple[int, str]]:
    """A retrieval-task file (lastturn / rewrite): id -> (line, text without the "|user|: " prefix)."""
    where = str(path)
    queries: dict[str, tuple[int, str]] = {}
    with open(path, "rb") as f:
        for number, record in _json_objects(f, where):
            query_id = _string_field(record, "_id", where, number, empty_ok=False)
            text = _strip_user(_string_field(record, "text", where, number))
            if not text.strip():
                raise DataError(where, f"empty query text for {query_id!r}", number)
            if query_id in queries:
                raise DataError(where, f"duplicate id {query_id!r} (first on line {queries[query_id][0]})", number)
            queries[query_id] = (number, text)
    if not queries:
        raise DataError(where, "no retrieval tasks")
    return queries


def _turn_number(value, where: str, number: int) -> int:
    if isinstance(value, bool):
        value = None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or value < 1:
        raise DataError(where, f'"turn" is not a positive integer ({value!r})', number)
    return value


def _annotation(record: dict, key: str, where: str, number: int):
    """MTRAG's label list for ``key`` (task level, else the last input turn's enrichments); None when absent."""
    sources = [record]
    last = record["input"][-1]
    if isinstance(last.get("enrichments"), dict):
        sources.append(last["enrichments"])
    for source in sources:
        for name, value in source.items():
            if name.lower() == key.lower():
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    continue
                if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                    return value
                raise DataError(where, f'"{name}" is neither a label nor a list of labels', number)
    return None


def read_generation_tasks(path: str | os.PathLike, wanted: Iterable[str]) -> dict[str, dict]:
    """Conversation fields of the ``wanted`` task ids from generation_tasks/reference.jsonl."""
    where = str(path)
    wanted = set(wanted)
    tasks: dict[str, dict] = {}
    lines: dict[str, int] = {}
    with open(path, "rb") as f:
        for number, record in _json_objects(f, where):
            task_id = _string_field(record, "task_id", where, number, empty_ok=False)
            if task_id in lines:
                raise DataError(where, f"duplicate task_id {task_id!r} (first on line {lines[task_id]})", number)
            lines[task_id] = number
            if task_id not in wanted:
                continue
            conversation_id = _string_field(record, "conversation_id", where, number, empty_ok=False)
            turn = _turn_number(record.get("turn"), where, number)
            messages = record.get("input")
            if not isinstance(messages, list) or not messages:
                raise DataError(where, f'"input" of {task_id!r} is not a non-empty list of turns', number)
            turns = []
            for i, message in enumerate(messages):
                if not isinstance(message, dict):
                    raise DataError(where, f'"input"[{i}] of {task_id!r} is not an object', number)
                speaker = message.get("speaker")
                if speaker not in SPEAKERS:
                    reason = f'"input"[{i}] of {task_id!r}: speaker {speaker!r} is not user or agent'
                    raise DataError(where, reason, number)
                if not isinstance(message.get("text"), str):
                    raise DataError(where, f'"input"[{i}] of {task_id!r}: missing "text"', number)
                turns.append({"speaker": speaker, "text": message["text"]})
            if turns[-1]["speaker"] != "user":
                raise DataError(where, f'"input" of {task_id!r} does not end with a user turn', number)
            task = {"conversation_id": conversation_id, "turn": turn, "history": turns[:-1]}
            for field, key in ANNOTATIONS.items():
                value = _annotation(record, key, where, number)
                if value is not None:
                    task[field] = value
            tasks[task_id] = task
    return tasks


# ---------------------------------------------------------------------------------------------- conversion


def convert_mtrag(repo_dir: str | os.PathLike, domain: str) -> Dataset:
    """Convert one MTRAG domain from a copy of the repository into a validated Dataset (qrels split "test")."""
    files = mtrag_files(repo_dir, domain)
    lastturn = read_task_queries(files.lastturn)
    rewrites = read_task_queries(files.rewrite)
    for query_id, (number, _) in rewrites.items():
        if query_id not in lastturn:
            reason = f"rewrite for unknown task {query_id!r} (not in {files.lastturn.name})"
            raise DataError(files.rewrite, reason, number)
    tasks = read_generation_tasks(files.tasks, lastturn)
    queries: dict[str, dict] = {}
    for query_id, (number, text) in lastturn.items():
        task = tasks.get(query_id)
        if task is None:
            raise DataError(files.tasks, f"no task {query_id!r} (retrieval task on line {number} of {files.lastturn})")
        record = {"text": text, "conversation_id": task["conversation_id"], "turn": task["turn"],
                  "history": task["history"]}
        if query_id in rewrites:
            record["rewrite"] = rewrites[query_id][1]
        record.update((k, task[k]) for k in ANNOTATIONS if k in task)
        queries[query_id] = record
    corpus = read_mtrag_corpus(files.corpus, domain)
    qrels = read_qrels(files.qrels, corpus_ids=corpus, query_ids=queries)
    return Dataset(corpus=corpus, queries=queries, qrels={QRELS_SPLIT: qrels})


# ------------------------------------------------------------------------------------------------- fetching


def _wanted_member(name: str, domain: str) -> bool:
    """Whether an archive member is one of the files convert_mtrag reads for ``domain``."""
    parts = name.split("/")
    if "corpora" in parts and "document_level" not in parts:
        return parts[-1].startswith(f"{domain}.")
    return f"retrieval_tasks/{domain}/" in name or name.endswith("generation_tasks/reference.jsonl")


def _download(url: str, archive: Path, progress: bool, domain: str) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
            size = int(response.headers.get("Content-Length") or 0) or None
            desc = "download mt-rag-benchmark"
            with tqdm(total=size, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as err:
        raise FetchError(f"cannot download MTRAG from {url}: {err}; {_offline_hint(domain)}") from err


def fetch_mtrag(
    domain: str, out_dir: str | os.PathLike, *, url: str = MTRAG_REPO_URL, progress: bool = True
) -> Dataset:
    """Download the MTRAG repository archive, convert ``domain`` and write it to ``out_dir`` in BEIR layout.

    The archive goes to a temporary folder beside ``out_dir`` (removed in any case) and ``out_dir`` appears only
    once complete. With RETRIEVAL_DATA_MIRROR set, ``<mirror>/mtrag-<domain>/`` (BEIR layout) replaces the network.
    """
    _check_domain(domain)
    out_dir = Path(out_dir)
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        folder = Path(mirror) / f"mtrag-{domain}"
        if not folder.is_dir():
            raise FetchError(f"dataset folder {folder} does not exist ({MIRROR_ENV}={mirror})")
        dataset = load_beir(folder)
    else:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", suffix=".download", dir=out_dir.parent) as tmp:
            archive = Path(tmp) / "mt-rag-benchmark.zip"
            _download(url, archive, progress, domain)
            unpacked = Path(tmp) / "unpacked"
            try:
                with zipfile.ZipFile(archive) as zf:
                    members = [n for n in zf.namelist() if _wanted_member(n, domain)]
                    zf.extractall(unpacked, members=members)  # extractall drops absolute paths and ".." parts
            except zipfile.BadZipFile as err:
                raise FetchError(f"{url} is not a valid zip archive: {err}") from err
            unpacked.mkdir(exist_ok=True)
            try:
                dataset = convert_mtrag(unpacked, domain)
            except DataError as err:  # name the file inside the archive, not the temporary folder
                where = err.path.replace(str(unpacked) + os.sep, f"{url}!").replace(str(unpacked), url)
                raise DataError(where, err.reason, err.line) from err
    write_beir(dataset, out_dir)
    return dataset
