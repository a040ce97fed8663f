"""Get a dataset into a folder in BEIR layout, from a local folder, the BEIR zip server or the Hugging Face hub.

Machines without access to the data hubs set RETRIEVAL_DATA_MIRROR to a folder holding ``<name>/`` in BEIR
layout; it then replaces the network for the "beir" and "hf" sources.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from retrieval.dataset import Dataset, load_beir, write_beir

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"
MIRROR_ENV = "RETRIEVAL_DATA_MIRROR"
SOURCES = ("dir", "beir", "hf")
HF_QRELS_SPLITS = ("train", "dev", "test")
_OFFLINE_HINT = f"set {MIRROR_ENV} to a folder holding <name>/ in BEIR layout, or use source 'dir' with a local path"


class FetchError(RuntimeError):
    """The dataset could not be obtained (network, missing mirror or folder, bad archive)."""


def fetch_dataset(
    name: str,
    source: str,
    out_dir: str | os.PathLike,
    *,
    path: str | None = None,
    url_template: str = BEIR_URL,
    hf_repo: str | None = None,
    progress: bool = True,
) -> Dataset:
    """Fetch dataset ``name`` from ``source``, validate it, and write it to ``out_dir`` (atomically)."""
    if source not in SOURCES:
        raise ValueError(f"unknown dataset source {source!r}; valid sources: {', '.join(SOURCES)}")
    out_dir = Path(out_dir)
    mirror = os.environ.get(MIRROR_ENV)
    if source == "dir" or (mirror and source in ("beir", "hf")):
        if source == "dir":
            if not path:
                raise ValueError("source 'dir' needs path= (a local folder in BEIR layout)")
            folder = Path(path)
        else:
            folder = Path(mirror) / name
        if not folder.is_dir():
            origin = "source 'dir' path" if source == "dir" else f"{MIRROR_ENV}={mirror}"
            raise FetchError(f"dataset folder {folder} does not exist ({origin})")
        dataset = load_beir(folder)
    else:
        # Downloads go to a temporary folder beside out_dir (same disk, can be large), removed in any case.
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", suffix=".download", dir=out_dir.parent) as tmp:
            if source == "beir":
                folder = _download_beir_zip(url_template.format(name=name), name, Path(tmp), progress)
            else:
                folder = _download_hf(hf_repo or f"BeIR/{name}", Path(tmp), progress)
            dataset = load_beir(folder)
    write_beir(dataset, out_dir)
    return dataset


def _download_beir_zip(url: str, name: str, tmp: Path, progress: bool) -> Path:
    """Download and unpack a BEIR zip; return the folder holding corpus.jsonl."""
    archive = tmp / f"{name}.zip"
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=f"download {name}", disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as err:
        raise FetchError(f"cannot download {url}: {err}; {_OFFLINE_HINT}") from err
    unpacked = tmp / "unpacked"
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(unpacked)  # extractall drops absolute paths and ".." parts
    except zipfile.BadZipFile as err:
        raise FetchError(f"{url} is not a valid zip archive: {err}") from err
    # BEIR zips hold a top folder <name>/; accept a flat archive or one differently named top folder too.
    candidates = [unpacked / name, unpacked] + sorted(p for p in unpacked.iterdir() if p.is_dir())
    for folder in candidates:
        if (folder / "corpus.jsonl").is_file():
            return folder
    raise FetchError(f"{url}: archive has no corpus.jsonl in {name}/ or at its top")


def _download_hf(repo: str, tmp: Path, progress: bool) -> Path:
    """Download BeIR-style hub datasets (``repo`` and ``repo-qrels``) into a BEIR folder under ``tmp``."""
    import huggingface_hub  # imported late: slow, and only this source needs it
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    def download(repo_id: str, filename: str) -> Path:
        try:
            return Path(huggingface_hub.hf_hub_download(repo_id, filename, repo_type="dataset"))
        except LocalEntryNotFoundError as err:  # raised when the hub cannot be reached (and nothing is cached)
            raise FetchError(f"cannot reach the Hugging Face hub for {repo_id}/{filename}: {err}; {_OFFLINE_HINT}") from err
        except EntryNotFoundError:
            raise
        except OSError as err:  # connection errors, unknown repository, HTTP errors
            raise FetchError(f"cannot download {repo_id}/{filename} from the Hugging Face hub: {err}; {_OFFLINE_HINT}") from err

    folder = tmp / "beir"
    (folder / "qrels").mkdir(parents=True)
    for part in tqdm(("corpus", "queries"), desc=f"download {repo}", disable=not progress):
        try:
            gz = download(repo, f"{part}.jsonl.gz")
        except EntryNotFoundError as err:
            raise FetchError(f"{repo} has no {part}.jsonl.gz: {err}") from err
        with gzip.open(gz, "rb") as src, open(folder / f"{part}.jsonl", "wb") as dst:
            shutil.copyfileobj(src, dst)
    for split in HF_QRELS_SPLITS:
        try:
            tsv = download(f"{repo}-qrels", f"{split}.tsv")
        except EntryNotFoundError:
            continue  # not every dataset has every split
        shutil.copyfile(tsv, folder / "qrels" / f"{split}.tsv")
    return folder
