"""MTRAG conversion: a tiny copy of the mt-rag-benchmark repository in its real layout, converted and fetched."""

import functools
import http.server
import io
import json
import re
import socket
import threading
import zipfile
from pathlib import Path

import pytest

from retrieval.dataset import DataError, load_beir, write_beir
from retrieval.download import MIRROR_ENV, FetchError
from retrieval.mtrag import DOMAINS, MTRAG_REPO_URL, convert_mtrag, fetch_mtrag

TOP = "mt-rag-benchmark-main"  # the top folder of GitHub's archive of the main branch
A = "0a5a5b0b1ad8c2a7c1e2e3e4f5a6b7c8"
B = "9f8e7d6c5b4a39281706f5e4d3c2b1a0"
CLOUD = "mt-rag-ibmcloud-elser-512-100-20240502"
CLAPNQ = "mt-rag-clapnq-elser-512-100-20240503"

PASSAGES = [  # as in corpora/passage_level/cloud.jsonl: _id and id equal, url, text, title (often empty)
    ("ibmcld_00474-7885-8455", "", "IBM Cloudant is a document database that stores JSON objects."),
    ("ibmcld_00510-7123-9213", "Attachments", "Store an image or PDF as an attachment.\n\n Size limits apply. "),
    ("ibmcld_00526-7-1750", "", "Attachments can be up to 10 MB."),
    ("ibmcld_14984-4-2041", "VPC", "A Virtual Private Cloud (VPC) is a private network in IBM Cloud."),
    ("ibmcld_14870-7-1912", "", "Pricing \u2014 VPC itself is free; you pay for resources."),
    ("ibmcld_16727-0-0", "", ""),  # MTRAG's corpora hold a few empty passages; they are kept
]

# Two conversations of three turns; B's second turn is unanswerable, so it is no retrieval task (as in MTRAG),
# but it is part of the history of B's third turn.
TURNS = {
    A: [
        ("does IBM offer document databases?", "Yes, IBM Cloudant stores JSON documents.",
         {"Question Type": ["Factoid"], "Multi-Turn": ["N/A"], "Answerability": ["ANSWERABLE"]}),
        ("What if I want to store an image or pdf with a document? ", "You can add attachments.",
         {"Question Type": ["How-To"], "Multi-Turn": ["Follow-up"], "Answerability": ["ANSWERABLE"]}),
        ("Is there a limit on the file size?", "Attachments can be up to 10 MB.",
         {"Question Type": ["Factoid", "Explanation"], "Multi-Turn": ["Clarification"], "Answerability": ["PARTIAL"]}),
    ],
    B: [
        ("What is a VPC?", "A private network in IBM Cloud.",
         {"Question Type": ["Factoid"], "Multi-Turn": ["N/A"], "Answerability": ["ANSWERABLE"]}),
        ("where do the arizona cardinals play this week", "I'm sorry, I don't have that information.",
         {"Question Type": ["Factoid"], "Multi-Turn": ["N/A"], "Answerability": ["UNANSWERABLE"]}),
        (" Is it free?", "VPC itself is free.",
         {"Question Type": ["Opinion"], "Multi-Turn": ["Follow-up"], "Answerability": ["ANSWERABLE"]}),
    ],
}
RETRIEVAL_TASKS = [(A, 1), (A, 2), (A, 3), (B, 1), (B, 3)]
REWRITES = {
    (A, 1): "does IBM offer document databases?",
    (A, 2): "Is it possible to store an image or PDF with a document in IBM Cloudant?",
    (A, 3): "What is the file size limit for attachments in IBM Cloudant?",
    (B, 1): "What is a VPC?",
    (B, 3): "Is IBM Cloud VPC free?",
}
QRELS = [
    ((A, 1), "ibmcld_00474-7885-8455"),
    ((A, 2), "ibmcld_00510-7123-9213"),
    ((A, 3), "ibmcld_00526-7-1750"),
    ((A, 3), "ibmcld_00510-7123-9213"),
    ((B, 1), "ibmcld_14984-4-2041"),
    ((B, 3), "ibmcld_14870-7-1912"),
]


def task_id(conversation: str, turn: int) -> str:
    return f"{conversation}<::>{turn}"


def compact(record) -> str:  # MTRAG's retrieval files are written without spaces
    return json.dumps(record, separators=(",", ":"))


def jsonl(records, dumps=json.dumps) -> str:
    return "".join(dumps(r) + "\n" for r in records)


def zip_bytes(members: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return buffer.getvalue()


def generation_tasks() -> list[dict]:
    """generation_tasks/reference.jsonl: one task per turn (all turns, all domains), "turn" a string."""
    tasks = []
    for conversation, turns in TURNS.items():
        so_far = []
        for n, (question, answer, annotations) in enumerate(turns, start=1):
            so_far.append({"speaker": "user", "text": question,
                           "metadata": {"author_type": "human", "author_id": "x", "created_at": 1724708469 + n}})
            tasks.append({
                "conversation_id": conversation, "task_id": task_id(conversation, n), "task_type": "rag",
                "turn": str(n), "dataset": "MT-RAG Authors (Internal)",
                "contexts": [{"document_id": PASSAGES[0][0], "text": PASSAGES[0][2], "score": 20.5}],
                "input": list(so_far),
                "targets": [{"speaker": "agent", "text": answer, "metadata": {"author_type": "model"}}],
                **annotations, "Collection": CLOUD,
            })
            so_far.append({"speaker": "agent", "text": answer, "metadata": {"author_type": "model"}})
    tasks.insert(3, {  # another domain's task: ignored
        "conversation_id": "dd6b6ffd177f2b311abe676261279d2f", "task_id": "dd6b6ffd177f2b311abe676261279d2f<::>1",
        "task_type": "rag", "turn": "1", "contexts": [],
        "input": [{"speaker": "user", "text": "who is the patriots coach"}],
        "targets": [{"speaker": "agent", "text": "Bill Belichick."}],
        "Question Type": ["Factoid"], "Multi-Turn": ["N/A"], "Answerability": ["ANSWERABLE"], "Collection": CLAPNQ,
    })
    return tasks


def write_mtrag_repo(root: Path, *, human: str = "mtrag-human", corpus: str = "corpora/passage_level/{d}.jsonl.zip",
                     ) -> Path:
    """A tiny mt-rag-benchmark checkout in the repository's own layout (current one by default)."""
    def put(rel: str, data: str | bytes) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))

    put("README.md", "# MTRAG: Multi-Turn RAG Benchmark\n")
    put("corpora/README.md", "Download and uncompress the files to use the corpora.\n")
    cloud = [{"_id": i, "id": i, "url": f"https://cloud.ibm.com/docs/{n}", "text": text, "title": title}
             for n, (i, title, text) in enumerate(PASSAGES)]
    put(corpus.format(d="cloud"), zip_bytes({"cloud.jsonl": jsonl(cloud)}))
    clapnq = [{"_id": "822086267_6698-7277-0-579", "id": "822086267_6698-7277-0-579", "url": "",
               "text": "2017 Arizona Cardinals season", "title": "2017 Arizona Cardinals season"}]
    put(corpus.format(d="clapnq"), zip_bytes({"clapnq.jsonl": jsonl(clapnq)}))
    tasks = f"{human}/retrieval_tasks/cloud"
    put(f"{tasks}/cloud_lastturn.jsonl", jsonl(
        ({"_id": task_id(c, t), "text": f"|user|: {TURNS[c][t - 1][0]}"} for c, t in RETRIEVAL_TASKS), compact))
    put(f"{tasks}/cloud_rewrite.jsonl", jsonl(
        ({"_id": task_id(c, t), "text": f"|user|: {REWRITES[c, t]}"} for c, t in RETRIEVAL_TASKS), compact))
    put(f"{tasks}/cloud_questions.jsonl", jsonl(
        ({"_id": task_id(c, t), "text": "\n".join(f"|user|: {q}" for q, _, _ in TURNS[c][:t])}
         for c, t in RETRIEVAL_TASKS), compact))
    put(f"{tasks}/qrels/dev.tsv", "query-id\tcorpus-id\tscore\n" + "".join(
        f"{task_id(*q)}\t{d}\t1\n" for q, d in QRELS))
    put(f"{human}/generation_tasks/reference.jsonl", jsonl(generation_tasks()))
    put(f"{human}/conversations/conversations.json", json.dumps([  # not read: it carries no conversation ids
        {"author": "x", "retriever": {"collection": {"name": CLOUD}}, "status": "accepted", "domain": CLOUD,
         "messages": [m for q, a, e in turns for m in ({"speaker": "user", "text": q, "enrichments": e},
                                                        {"speaker": "agent", "text": a, "contexts": []})]}
        for turns in TURNS.values()]))
    return root


def expected_queries() -> dict[str, dict]:
    queries = {}
    for conversation, turn in RETRIEVAL_TASKS:
        history = []
        for question, answer, _ in TURNS[conversation][:turn - 1]:
            history += [{"speaker": "user", "text": question}, {"speaker": "agent", "text": answer}]
        annotations = TURNS[conversation][turn - 1][2]
        queries[task_id(conversation, turn)] = {
            "text": TURNS[conversation][turn - 1][0], "conversation_id": conversation, "turn": turn,
            "history": history, "rewrite": REWRITES[conversation, turn],
            "answerability": annotations["Answerability"], "question_type": annotations["Question Type"],
            "multi_turn": annotations["Multi-Turn"],
        }
    return queries


@pytest.fixture(autouse=True)
def no_mirror(monkeypatch):
    monkeypatch.delenv(MIRROR_ENV, raising=False)


@pytest.fixture
def repo(tmp_path) -> Path:
    return write_mtrag_repo(tmp_path / "src" / TOP)


def test_constants():
    assert DOMAINS == ("clapnq", "cloud", "fiqa", "govt")
    assert MTRAG_REPO_URL == "https://github.com/IBM/mt-rag-benchmark/archive/refs/heads/main.zip"


def test_convert_exact(repo):
    dataset = convert_mtrag(repo, "cloud")
    assert dataset.corpus == {i: {"title": title, "text": text} for i, title, text in PASSAGES}
    assert list(dataset.corpus) == [p[0] for p in PASSAGES]  # file order
    assert dataset.queries == expected_queries()
    assert list(dataset.queries) == [task_id(c, t) for c, t in RETRIEVAL_TASKS]
    b3 = dataset.queries[task_id(B, 3)]
    assert b3["text"] == " Is it free?"  # only "|user|: " is removed, the turn is kept as typed
    assert [(h["speaker"], h["text"]) for h in b3["history"]] == [
        ("user", "What is a VPC?"), ("agent", "A private network in IBM Cloud."),
        ("user", "where do the arizona cardinals play this week"), ("agent", "I'm sorry, I don't have that information."),
    ]
    assert dataset.queries[task_id(A, 1)]["history"] == []
    assert dataset.queries[task_id(A, 2)]["text"].endswith("document? ")
    assert dataset.qrels == {"test": {
        task_id(A, 1): {"ibmcld_00474-7885-8455": 1},
        task_id(A, 2): {"ibmcld_00510-7123-9213": 1},
        task_id(A, 3): {"ibmcld_00526-7-1750": 1, "ibmcld_00510-7123-9213": 1},
        task_id(B, 1): {"ibmcld_14984-4-2041": 1},
        task_id(B, 3): {"ibmcld_14870-7-1912": 1},
    }}


def test_convert_writes_beir_that_loads_back(repo, tmp_path):
    dataset = convert_mtrag(repo, "cloud")
    write_beir(dataset, tmp_path / "out")
    assert load_beir(tmp_path / "out") == dataset
    lines = (tmp_path / "out" / "queries.jsonl").read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    assert list(first)[:6] == ["_id", "text", "conversation_id", "turn", "history", "rewrite"]
    assert (tmp_path / "out" / "qrels" / "test.tsv").read_text().splitlines()[:2] == [
        "query-id\tcorpus-id\tscore", f"{task_id(A, 1)}\tibmcld_00474-7885-8455\t1"]


def test_convert_accepts_archive_folder_and_older_layout(tmp_path, repo):
    expected = convert_mtrag(repo, "cloud")
    assert convert_mtrag(repo.parent, "cloud") == expected  # the folder an archive was unzipped into
    old = write_mtrag_repo(tmp_path / "old", human="human", corpus="corpora/{d}.jsonl.zip")
    assert convert_mtrag(old, "cloud") == expected


def test_convert_missing_rewrite_and_mtrag_un_annotations(repo):
    rewrite = repo / "mtrag-human/retrieval_tasks/cloud/cloud_rewrite.jsonl"
    rewrite.write_text("".join(rewrite.read_text().splitlines(keepends=True)[:-1]))
    reference = repo / "mtrag-human/generation_tasks/reference.jsonl"
    tasks = [json.loads(line) for line in reference.read_text().splitlines()]
    for task in tasks:  # MTRAG-UN style: lowercase "answerability", NaN for a missing annotation
        task["answerability"] = task.pop("Answerability")
        task["Multi-Turn"] = float("nan")
    reference.write_text(jsonl(tasks))
    queries = convert_mtrag(repo, "cloud").queries
    assert "rewrite" not in queries[task_id(B, 3)] and queries[task_id(B, 1)]["rewrite"] == "What is a VPC?"
    assert queries[task_id(A, 3)]["answerability"] == ["PARTIAL"]
    assert all("multi_turn" not in q for q in queries.values())


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def edit_task(path: Path, index: int, change) -> None:
    tasks = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    change(tasks[index])
    path.write_text(jsonl(tasks), encoding="utf-8")


RT = "mtrag-human/retrieval_tasks/cloud"
REF = "mtrag-human/generation_tasks/reference.jsonl"


@pytest.mark.parametrize("damage, pattern", [
    (lambda r: (r / RT / "cloud_lastturn.jsonl").unlink(),
     r"cloud_lastturn\.jsonl: missing \(lastturn file of MTRAG domain 'cloud'\)"),
    (lambda r: (r / RT / "qrels" / "dev.tsv").unlink(), r"qrels/dev\.tsv: missing \(qrels file"),
    (lambda r: (r / REF).unlink(), r"generation_tasks/reference\.jsonl: missing \(tasks file"),
    (lambda r: (r / "corpora/passage_level/cloud.jsonl.zip").unlink(),
     r"corpora: missing corpus of MTRAG domain 'cloud' \(looked for corpora/passage_level/cloud\.jsonl\.zip"),
    (lambda r: (r / "corpora/passage_level/cloud.jsonl.zip").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n"), r"cloud\.jsonl\.zip: is a Git LFS pointer"),
    (lambda r: (r / "corpora/passage_level/cloud.jsonl.zip").write_text("junk"), r"cloud\.jsonl\.zip: not a valid zip"),
    (lambda r: (r / "corpora/passage_level/cloud.jsonl.zip").write_bytes(zip_bytes({
        "cloud.jsonl": jsonl([{"_id": "p1", "text": "a"}, {"_id": "p1", "text": "b"}])})),
     r"cloud\.jsonl\.zip!cloud\.jsonl:2: duplicate passage id 'p1' \(first on line 1\)"),
    (lambda r: (r / "corpora/passage_level/cloud.jsonl.zip").write_bytes(zip_bytes({
        "cloud.jsonl": '{"_id": "p1", "text": "a"}\n{"_id": "p2"}\n'})), r"cloud\.jsonl\.zip!cloud\.jsonl:2: missing \"text\""),
    (lambda r: edit(r / RT / "cloud_lastturn.jsonl", task_id(A, 2), task_id(A, 1)),
     rf"cloud_lastturn\.jsonl:2: duplicate id '{A}<::>1' \(first on line 1\)"),
    (lambda r: edit(r / RT / "cloud_rewrite.jsonl", task_id(B, 3), task_id(B, 2)),
     rf"cloud_rewrite\.jsonl:5: rewrite for unknown task '{B}<::>2'"),
    (lambda r: edit(r / REF, f'"task_id": "{task_id(B, 3)}"', '"task_id": "gone"'),
     rf"reference\.jsonl: no task '{B}<::>3' \(retrieval task on line 5 of .*cloud_lastturn\.jsonl\)"),
    (lambda r: edit(r / REF, '{"conversation_id"', '{"conversation_id" ]'), r"reference\.jsonl:1: not valid JSON"),
    (lambda r: edit_task(r / REF, 1, lambda t: t["input"][1].update(speaker="assistant")),
     rf"reference\.jsonl:2: \"input\"\[1\] of '{A}<::>2': speaker 'assistant' is not user or agent"),
    (lambda r: edit(r / REF, '"turn": "2"', '"turn": "second"'), r"reference\.jsonl:2: \"turn\" is not a positive integer"),
    (lambda r: edit(r / RT / "qrels" / "dev.tsv", "ibmcld_00526-7-1750", "ibmcld_99999-0-1"),
     r"dev\.tsv:4: unknown corpus id 'ibmcld_99999-0-1' \(not in corpus\)"),
    (lambda r: edit(r / RT / "qrels" / "dev.tsv", task_id(B, 3), task_id(B, 2)),
     rf"dev\.tsv:7: unknown query id '{B}<::>2' \(not in queries\)"),
])
def test_convert_errors_name_file_and_reason(repo, damage, pattern):
    damage(repo)
    with pytest.raises(DataError, match=pattern):
        convert_mtrag(repo, "cloud")


def test_convert_domain_errors(repo, tmp_path):
    with pytest.raises(ValueError, match="unknown MTRAG domain 'ibmcloud'; valid domains: clapnq, cloud, fiqa, govt"):
        convert_mtrag(repo, "ibmcloud")
    with pytest.raises(DataError, match=r"retrieval_tasks/govt: missing: no retrieval tasks for domain 'govt'"):
        convert_mtrag(repo, "govt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a copy of the mt-rag-benchmark repository"):
        convert_mtrag(tmp_path / "empty", "cloud")


# ------------------------------------------------------------------------------------------------ fetching


def zip_repo(repo: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for file in sorted(repo.rglob("*")):
            if file.is_file():
                zf.write(file, f"{TOP}/{file.relative_to(repo)}")
    return archive


@pytest.fixture
def http_root(tmp_path):
    """Serve the folder tmp_path/www on 127.0.0.1 from a thread; yield (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=root))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_fetch_over_http(repo, tmp_path, http_root):
    www, base = http_root
    zip_repo(repo, www / "main.zip")
    out = tmp_path / "data" / "mtrag-cloud"
    dataset = fetch_mtrag("cloud", out, url=f"{base}/main.zip", progress=False)
    assert dataset == convert_mtrag(repo, "cloud") == load_beir(out)
    assert entries(out) == ["corpus.jsonl", "qrels", "queries.jsonl"]
    assert entries(out / "qrels") == ["test.tsv"]
    assert entries(tmp_path / "data") == ["mtrag-cloud"]  # no download or temporary folder left


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fetch_unreachable_leaves_no_output(tmp_path):
    url = f"http://127.0.0.1:{unused_port()}/main.zip"
    data = tmp_path / "data"
    with pytest.raises(FetchError, match=rf"cannot download MTRAG from {re.escape(url)}: .*{MIRROR_ENV} to a folder "
                                         rf"holding mtrag-cloud/ in BEIR layout, or use source 'dir'"):
        fetch_mtrag("cloud", data / "mtrag-cloud", url=url, progress=False)
    assert entries(data) == []


def test_fetch_failures_leave_no_output(repo, tmp_path, http_root):
    www, base = http_root
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(FetchError, match=rf"cannot download MTRAG from {re.escape(base)}/absent\.zip: .*404"):
        fetch_mtrag("cloud", data / "mtrag-cloud", url=f"{base}/absent.zip", progress=False)
    (www / "junk.zip").write_text("not a zip")
    with pytest.raises(FetchError, match="junk.zip is not a valid zip archive"):
        fetch_mtrag("cloud", data / "mtrag-cloud", url=f"{base}/junk.zip", progress=False)
    zip_repo(repo, www / "main.zip")
    with pytest.raises(DataError, match=rf"{re.escape(base)}/main\.zip!{TOP}/mtrag-human/retrieval_tasks/fiqa .*"
                                        r"missing: no retrieval tasks for domain 'fiqa'"):
        fetch_mtrag("fiqa", data / "mtrag-fiqa", url=f"{base}/main.zip", progress=False)
    (repo / "corpora/passage_level/cloud.jsonl.zip").unlink()
    zip_repo(repo, www / "nocorpus.zip")
    with pytest.raises(DataError, match=rf"{re.escape(base)}/nocorpus\.zip!{TOP}/corpora: missing corpus"):
        fetch_mtrag("cloud", data / "mtrag-cloud", url=f"{base}/nocorpus.zip", progress=False)
    with pytest.raises(ValueError, match="unknown MTRAG domain"):
        fetch_mtrag("wiki", data / "mtrag-wiki", url=f"{base}/main.zip", progress=False)
    assert entries(data) == []


def test_failed_fetch_keeps_previous_output(repo, tmp_path, http_root):
    www, base = http_root
    zip_repo(repo, www / "main.zip")
    out = tmp_path / "data" / "mtrag-cloud"
    fetch_mtrag("cloud", out, url=f"{base}/main.zip", progress=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(FetchError):
        fetch_mtrag("cloud", out, url=f"{base}/absent.zip", progress=False)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert entries(tmp_path / "data") == ["mtrag-cloud"]


def test_fetch_from_mirror(repo, tmp_path, monkeypatch):
    write_beir(convert_mtrag(repo, "cloud"), tmp_path / "mirror" / "mtrag-cloud")
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "mirror"))
    url = f"http://127.0.0.1:{unused_port()}/main.zip"  # never contacted
    dataset = fetch_mtrag("cloud", tmp_path / "out", url=url, progress=False)
    assert dataset == load_beir(tmp_path / "mirror" / "mtrag-cloud") == load_beir(tmp_path / "out")
    with pytest.raises(FetchError, match=rf"mtrag-govt does not exist \({MIRROR_ENV}="):
        fetch_mtrag("govt", tmp_path / "out-govt", url=url, progress=False)
    assert not (tmp_path / "out-govt").exists()
