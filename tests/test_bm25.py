"""BM25 over a real Lucene index (pyserini), and the JVM set-up in retrieval/jvm.py.

The JVM starts once per process (~10 s), so the index is built once per module.
"""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from retrieval import jvm
from retrieval.bm25 import BM25Searcher, build_bm25_index, hits_to_run

CORPUS = {
    "d01": {"title": "Solar energy", "text": "Photovoltaic panels convert sunlight into electricity."},
    "d02": {"title": "Wind power", "text": "Turbines turn wind into electricity on farms and offshore."},
    "d03": {"title": "Zanzibar travel", "text": "Beaches, spice tours and old stone town streets."},  # rare term in title only
    "d04": {"title": "", "text": "The axolotl is a salamander that keeps its larval features."},  # rare term, no title
    "d05": {"title": "Coffee", "text": "Coffee beans are roasted seeds of the coffee plant."},
    "d06": {"title": "Tea", "text": "Tea leaves are dried and steeped in hot water."},
    "d07": {"title": "Rivers", "text": "Rivers carry water from mountains to the sea."},
    "d08": {"title": "Electricity grid", "text": "The grid moves electricity from plants to homes."},
    "d09": {"title": "Batteries", "text": "Batteries store electricity as chemical energy."},
    # same single mention of "glacier", but d11 is much longer: length normalisation (b) must matter
    "d10": {"title": "Ice", "text": "A glacier moves."},
    "d11": {"title": "Mountains", "text": "A glacier lies between peaks where snow, rock, wind, cloud, "
            "meadow, forest, lake, trail, ridge and valley meet under a wide open sky every single day."},
}


@pytest.fixture(scope="module")
def first_start():
    """Start the JVM through jvm.lucene(), recording OPENAI_API_KEY around it when this is the process's first start."""
    with pytest.MonkeyPatch.context() as mp:
        fresh = jvm._prepare.cache_info().currsize == 0 and "pyserini.search.lucene" not in sys.modules
        if fresh:
            mp.delenv("OPENAI_API_KEY", raising=False)
        jvm.lucene()
        return {"fresh": fresh, "key_after": os.environ.get("OPENAI_API_KEY")}


@pytest.fixture(scope="module")
def index(first_start, tmp_path_factory):
    index_dir = tmp_path_factory.mktemp("bm25") / "index"
    stats = build_bm25_index(CORPUS, index_dir, threads=1)
    return index_dir, stats


@pytest.fixture(scope="module")
def searcher(index):
    return BM25Searcher(index[0])


# ---------------------------------------------------------------- index and search


def test_build_returns_stats_and_writes_index(index):
    index_dir, stats = index
    assert stats == {"num_docs": len(CORPUS)}
    assert index_dir.is_dir() and any(index_dir.iterdir())
    # built atomically: no temporary folders are left beside the index
    assert [p.name for p in index_dir.parent.iterdir()] == ["index"]


def test_num_docs(searcher):
    assert searcher.num_docs == len(CORPUS)


def test_rare_term_ranks_its_doc_first(searcher):
    hits = searcher.search("axolotl salamander", k=5)
    assert hits[0][0] == "d04"
    assert all(isinstance(doc, str) and isinstance(score, float) for doc, score in hits)
    # "electricity" is in 4 docs; a query on it returns exactly those, in descending score order
    hits = searcher.search("electricity", k=10)
    assert {doc for doc, _ in hits} == {"d01", "d02", "d08", "d09"}
    scores = [score for _, score in hits]
    assert scores == sorted(scores, reverse=True) and scores[-1] > 0


def test_k_limits_hits(searcher):
    assert len(searcher.search("electricity water energy", k=2)) == 2


def test_no_match_gives_no_hits(searcher):
    assert searcher.search("quetzalcoatl", k=10) == []


def test_title_is_searchable_flat_indexing(searcher, index):
    # "zanzibar" appears only in d03's title
    hits = searcher.search("zanzibar", k=10)
    assert [doc for doc, _ in hits] == ["d03"]
    # title and text share one field: "electricity" in d08's title and text counts as tf = 2, so with
    # b = 0 d08 outscores the docs that mention it once in their text only, which tie
    hits = dict(BM25Searcher(index[0], b=0.0).search("electricity", k=10))
    assert max(hits, key=hits.get) == "d08"
    once = [hits[d] for d in ("d01", "d02", "d09")]
    assert max(once) - min(once) < 1e-5 and hits["d08"] > max(once) + 0.1
    # and the doc without a title is still indexed by its text
    assert searcher.search("larval", k=10)[0][0] == "d04"


def test_batch_search_returns_every_qid(searcher):
    qids = ["qa", "qb", "qc"]
    results = searcher.batch_search(["axolotl", "zanzibar beaches", "quetzalcoatl"], qids, k=3, threads=2)
    assert list(results) == qids
    assert results["qa"][0][0] == "d04"
    assert results["qb"][0][0] == "d03"
    assert results["qc"] == []  # a query without any match is still present
    # same scores as single searches
    assert results["qa"] == searcher.search("axolotl", k=3)
    run = hits_to_run(results)
    assert run["qa"]["d04"] == results["qa"][0][1] and run["qc"] == {}


def test_bm25_score_matches_formula_without_length_normalisation(index):
    # With b = 0 the score of a one-term query on a doc with tf = 1 is idf * tf / (tf + k1),
    # idf = ln(1 + (N - df + 0.5) / (df + 0.5)) with N = 11, df = 1 for "axolotl".
    n, df, tf = len(CORPUS), 1, 1
    idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
    for k1 in (0.9, 1.2, 2.0):
        hits = BM25Searcher(index[0], k1=k1, b=0.0).search("axolotl", k=1)
        assert hits[0][0] == "d04"
        # Anserini rounds scores to 4 decimals (and nudges ties apart by 1e-6)
        assert hits[0][1] == pytest.approx(idf * tf / (tf + k1), abs=1e-4)


def test_k1_and_b_change_scores(index):
    default = dict(BM25Searcher(index[0]).search("glacier", k=5))
    other_k1 = dict(BM25Searcher(index[0], k1=2.0, b=0.4).search("glacier", k=5))
    no_length_norm = dict(BM25Searcher(index[0], k1=0.9, b=0.0).search("glacier", k=5))
    full_length_norm = dict(BM25Searcher(index[0], k1=0.9, b=1.0).search("glacier", k=5))
    assert set(default) == set(other_k1) == set(no_length_norm) == set(full_length_norm) == {"d10", "d11"}
    assert other_k1["d10"] != pytest.approx(default["d10"])
    # b = 0: length is ignored, so the short and long doc (tf = 1 each) tie (up to Anserini's 1e-6 tie nudge)
    assert no_length_norm["d10"] == pytest.approx(no_length_norm["d11"], abs=1e-5)
    # b > 0: the short doc wins, and more so as b grows
    assert default["d10"] > default["d11"]
    assert (full_length_norm["d10"] - full_length_norm["d11"]) > (default["d10"] - default["d11"])


def test_rebuild_replaces_index(tmp_path, first_start):
    index_dir = tmp_path / "index"
    build_bm25_index({"a": {"title": "one", "text": "alpha"}, "b": {"title": "two", "text": "beta"}}, index_dir)
    stats = build_bm25_index({"c": {"title": "", "text": "gamma"}}, index_dir)
    assert stats == {"num_docs": 1}
    searcher = BM25Searcher(index_dir)
    assert searcher.search("alpha") == []
    assert searcher.search("gamma")[0][0] == "c"
    assert [p.name for p in tmp_path.iterdir()] == ["index"]


def test_relative_index_paths_follow_the_current_folder_not_the_jvms(tmp_path, first_start, monkeypatch):
    """The JVM started in another folder (first_start): a relative path must still mean the current folder's, as it
    does for the explorer, which changes into a workspace after other tools started the JVM."""
    monkeypatch.chdir(tmp_path)
    stats = build_bm25_index({"a": {"title": "", "text": "axolotl"}}, Path("data/indexes/bm25"), threads=1)
    assert stats == {"num_docs": 1} and (tmp_path / "data/indexes/bm25").is_dir()
    assert BM25Searcher("data/indexes/bm25").search("axolotl")[0][0] == "a"


# ---------------------------------------------------------------- JVM set-up


def test_java_home_is_java_21_or_newer():
    home = Path(jvm.java_home())
    java = home / "bin" / "java"
    assert java.is_file() and os.access(java, os.X_OK)
    out = subprocess.run([str(java), "-version"], capture_output=True, text=True, timeout=60)
    match = re.search(r'version "(\d+)', out.stderr + out.stdout)
    assert match, out.stderr
    assert int(match.group(1)) >= 21


def test_java_major_parses_versions(tmp_path):
    # _java_major handles "1.8"-style and modern version strings, and missing binaries
    assert jvm._java_major(str(tmp_path / "no-such-java")) is None
    assert jvm._java_major(str(Path(jvm.java_home()) / "bin" / "java")) >= jvm.MIN_JAVA


def test_jvm_started_with_the_chosen_java_and_without_vector_module(first_start):
    import jnius_config

    assert jnius_config.vm_running
    assert "--add-modules=jdk.incubator.vector" not in jnius_config.get_options()
    assert any("anserini" in option for option in jnius_config.get_options())  # pyserini's classpath is kept
    assert os.environ["JAVA_HOME"] == jvm.java_home()
    from jnius import autoclass

    running = int(str(autoclass("java.lang.System").getProperty("java.specification.version")).split(".")[0])
    assert running >= jvm.MIN_JAVA


def test_lucene_returns_the_pyserini_module(first_start):
    module = jvm.lucene()
    assert module.__name__ == "pyserini.search.lucene"
    assert hasattr(module, "LuceneSearcher")
    assert jvm.lucene() is module


def test_openai_key_not_left_set_after_first_jvm_start(first_start):
    if not first_start["fresh"]:
        pytest.skip("the JVM was already started in this process before this module ran")
    assert first_start["key_after"] is None


def test_pyserini_module_does_not_leave_openai_key(first_start, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    module = jvm.pyserini_module("pyserini.index.lucene")
    assert module.__name__ == "pyserini.index.lucene"
    assert "OPENAI_API_KEY" not in os.environ


def test_placeholder_openai_key_is_scoped(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with jvm._placeholder_openai_key():
        assert os.environ["OPENAI_API_KEY"]  # set for the import
    assert "OPENAI_API_KEY" not in os.environ
    with pytest.raises(RuntimeError):
        with jvm._placeholder_openai_key():
            raise RuntimeError("import failed")
    assert "OPENAI_API_KEY" not in os.environ  # removed on error too


def test_placeholder_keeps_a_real_openai_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real")
    with jvm._placeholder_openai_key():
        assert os.environ["OPENAI_API_KEY"] == "sk-real"
    assert os.environ["OPENAI_API_KEY"] == "sk-real"
