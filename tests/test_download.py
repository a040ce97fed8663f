import functools
import gzip
import http.server
import threading
import zipfile
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

from retrieval.dataset import DataError, load_beir
from retrieval.download import MIRROR_ENV, FetchError, fetch_dataset
QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t2\n"
BAD_QRELS = QRELS + "q1\tnope\t1\n"


def make_beir(folder: Path, qrels: dict[str, str] | None = None) -> Path:
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text('{"_id": "d1", "title": "Cats", "text": "purr"}\n{"_id": "d2", "text": "bark"}\n')
    (folder / "queries.jsonl").write_text('{"_id": "q1", "text": "what purrs"}\n{"_id": "q2", "text": "what barks"}\n')
    for split, content in (qrels or {"test": QRELS}).items():
        (folder / "qrels" / f"{split}.tsv").write_text(content)
    return folder


@pytest.fixture(autouse=True)
def no_mirror(monkeypatch):
    monkeypatch.delenv(MIRROR_ENV, raising=False)


def zip_folder(folder: Path, archive: Path, top: str) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                zf.write(file, f"{top}/{file.relative_to(folder)}")
    return archive


@pytest.fixture
def http_root(tmp_path):
    """Serve the folder tmp_path/www over HTTP on 127.0.0.1; yield (folder, base URL)."""
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


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_source_dir(tmp_path):
    src = make_beir(tmp_path / "src")
    dataset = fetch_dataset("toy", "dir", tmp_path / "data" / "toy", path=str(src), progress=False)
    assert load_beir(tmp_path / "data" / "toy") == dataset == load_beir(src)
    assert leftovers(tmp_path / "data") == []


def test_source_dir_with_bad_qrels_leaves_nothing(tmp_path):
    src = make_beir(tmp_path / "src", qrels={"test": BAD_QRELS})
    out = tmp_path / "data" / "toy"
    with pytest.raises(DataError, match=r"test\.tsv:4: unknown corpus id 'nope'"):
        fetch_dataset("toy", "dir", out, path=str(src), progress=False)
    assert not out.exists()
    assert not (tmp_path / "data").exists() or list((tmp_path / "data").iterdir()) == []


def test_failed_fetch_keeps_previous_output(tmp_path):
    out = tmp_path / "data" / "toy"
    fetch_dataset("toy", "dir", out, path=str(make_beir(tmp_path / "good")), progress=False)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(DataError):
        fetch_dataset("toy", "dir", out, path=str(make_beir(tmp_path / "bad", qrels={"test": BAD_QRELS})))
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert leftovers(tmp_path / "data") == []


def test_source_dir_errors(tmp_path):
    with pytest.raises(FetchError, match="does not exist"):
        fetch_dataset("toy", "dir", tmp_path / "out", path=str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="needs path="):
        fetch_dataset("toy", "dir", tmp_path / "out")
    with pytest.raises(ValueError, match="unknown dataset source 'ftp'; valid sources: dir, beir, hf"):
        fetch_dataset("toy", "ftp", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source", ["beir", "hf"])
def test_mirror_replaces_network(tmp_path, monkeypatch, source):
    make_beir(tmp_path / "mirror" / "toy")
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "mirror"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("hub was contacted"))
    dataset = fetch_dataset("toy", source, tmp_path / "out", url_template="http://127.0.0.1:9/{name}.zip")
    assert dataset == load_beir(tmp_path / "mirror" / "toy") == load_beir(tmp_path / "out")


def test_missing_mirror_folder(tmp_path, monkeypatch):
    (tmp_path / "mirror").mkdir()
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "mirror"))
    with pytest.raises(FetchError, match=rf"{tmp_path / 'mirror' / 'toy'} does not exist \({MIRROR_ENV}="):
        fetch_dataset("toy", "beir", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_source_beir_over_http(tmp_path, http_root):
    root, base = http_root
    zip_folder(make_beir(tmp_path / "src"), root / "toy.zip", top="toy")
    out = tmp_path / "data" / "toy"
    dataset = fetch_dataset("toy", "beir", out, url_template=base + "/{name}.zip", progress=False)
    assert dataset == load_beir(tmp_path / "src") == load_beir(out)
    assert leftovers(tmp_path / "data") == []


def test_source_beir_file_url(tmp_path):
    zip_folder(make_beir(tmp_path / "src"), tmp_path / "toy.zip", top="toy")
    out = tmp_path / "data" / "toy"
    dataset = fetch_dataset("toy", "beir", out, url_template=f"file://{tmp_path}/{{name}}.zip", progress=False)
    assert dataset == load_beir(out)


def test_source_beir_failures_leave_nothing(tmp_path, http_root):
    root, base = http_root
    data = tmp_path / "data"
    data.mkdir()
    url = base + "/{name}.zip"
    with pytest.raises(FetchError, match=rf"cannot download {base}/missing.zip: .*404.*{MIRROR_ENV}"):
        fetch_dataset("missing", "beir", data / "missing", url_template=url, progress=False)
    (root / "junk.zip").write_text("not a zip")
    with pytest.raises(FetchError, match="not a valid zip archive"):
        fetch_dataset("junk", "beir", data / "junk", url_template=url, progress=False)
    zip_folder(make_beir(tmp_path / "bad", qrels={"test": BAD_QRELS}), root / "bad.zip", top="bad")
    with pytest.raises(DataError, match=r"bad/qrels/test\.tsv:4: unknown corpus id"):
        fetch_dataset("bad", "beir", data / "bad", url_template=url, progress=False)
    assert list(data.iterdir()) == []


def fake_hub(files: dict[tuple[str, str], Path]):
    def hf_hub_download(repo_id, filename, repo_type=None):
        assert repo_type == "dataset"
        if (repo_id, filename) not in files:
            raise EntryNotFoundError(f"404: {repo_id}/{filename}")
        return str(files[repo_id, filename])
    return hf_hub_download


def test_source_hf(tmp_path, monkeypatch):
    src = make_beir(tmp_path / "src", qrels={"test": QRELS, "train": "query-id\tcorpus-id\tscore\nq1\td2\t1\n"})
    files = {}
    for part in ("corpus", "queries"):
        gz = tmp_path / f"{part}.jsonl.gz"
        gz.write_bytes(gzip.compress((src / f"{part}.jsonl").read_bytes()))
        files["BeIR/toy", f"{part}.jsonl.gz"] = gz
    for split in ("test", "train"):  # no dev: a missing split is skipped
        files["BeIR/toy-qrels", f"{split}.tsv"] = src / "qrels" / f"{split}.tsv"
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hub(files))
    dataset = fetch_dataset("toy", "hf", tmp_path / "data" / "toy", progress=False)
    assert dataset == load_beir(src) == load_beir(tmp_path / "data" / "toy")
    assert leftovers(tmp_path / "data") == []


def test_source_hf_unreachable(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(FetchError, match=rf"cannot reach the Hugging Face hub for BeIR/toy/corpus.jsonl.gz.*{MIRROR_ENV}.*'dir'"):
        fetch_dataset("toy", "hf", tmp_path / "data" / "toy", progress=False)
    assert list((tmp_path / "data").iterdir()) == []
