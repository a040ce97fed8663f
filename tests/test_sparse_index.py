"""The Lucene impact index must return exactly what the in-memory integer dot product returns."""

import random

import pytest

from retrieval.sparse_index import ExactSparseSearcher, ImpactSearcher, build_impact_index, quantize

# WordPiece-style terms plus punctuation, case and non-ASCII, which the whitespace-tokenised index must keep intact.
TERMS = ["cell", "##ing", "##s", "protein", "Protein", "c++", "a.b", "x-y", "[CLS]", "don't", '"q"', "back\\slash",
         "é", "ωmega", "(", "?", "*", "gene", "##ase", "dna", "rna", "virus", "immune", "t-cell", "il-6"]


def _random_weights(rng: random.Random, num_terms: int) -> dict[str, float]:
    return {term: round(rng.uniform(0.0, 3.0), 3) for term in rng.sample(TERMS, num_terms)}


@pytest.fixture(scope="module")
def corpus():
    rng = random.Random(7)
    doc_ids = [f"doc{i:02d}" for i in range(20)]
    doc_weights = [_random_weights(rng, rng.randint(3, 10)) for _ in doc_ids]
    doc_weights[5] = dict(doc_weights[4])  # identical documents: the tie must be broken by id in both searchers
    doc_weights[6] = {"zero": 0.001}  # quantises to nothing: not indexed, never retrieved
    doc_weights[7]['"q"'] = 2.5  # the seed puts the quoted term in no document; it must be searched for too
    queries = [_random_weights(rng, rng.randint(1, 6)) for _ in range(30)]
    queries += [{"gene": 1.0}, {"unknown-term": 2.0}, {}, dict(doc_weights[4])]
    return doc_ids, doc_weights, queries


@pytest.fixture(scope="module")
def index(corpus, tmp_path_factory):
    doc_ids, doc_weights, _ = corpus
    index_dir = tmp_path_factory.mktemp("impact") / "index"
    stats = build_impact_index(doc_ids, doc_weights, index_dir, threads=2)
    return index_dir, stats


def test_quantize_rounds_and_drops_non_positive():
    assert quantize({"a": 1.234, "b": 0.004, "c": -1.0, "d": 0.005001}, scale=100) == {"a": 123, "d": 1}


def test_index_stats(corpus, index):
    doc_ids, doc_weights, _ = corpus
    _, stats = index
    indexed = [quantize(w) for w in doc_weights if quantize(w)]
    assert stats["num_docs"] == len(indexed) == len(doc_ids) - 1
    assert stats["avg_doc_terms"] == pytest.approx(sum(map(len, indexed)) / len(indexed))
    # the size of the folder the index was moved into, not of a temporary one
    assert stats["index_bytes"] == sum(f.stat().st_size for f in index[0].rglob("*") if f.is_file())


def test_impact_and_exact_search_agree(corpus, index):
    doc_ids, doc_weights, queries = corpus
    impact = ImpactSearcher(index[0])
    exact = ExactSparseSearcher(doc_ids, doc_weights)
    assert impact.num_docs == len(doc_ids) - 1
    for query in queries:
        expected = exact.search(query, k=10)
        assert impact.search(query, k=10) == expected  # same ids, same order, same (integer) scores
        for doc_id, score in expected:
            document = quantize(doc_weights[doc_ids.index(doc_id)])
            assert score == sum(impact_q * document.get(t, 0) for t, impact_q in quantize(query).items())
    qids = [f"q{i}" for i in range(len(queries))]
    assert impact.batch_search(queries, qids, k=10, threads=2) == exact.batch_search(queries, qids, k=10)
    # The identical documents tie; the smaller id comes first.
    tied = exact.search(doc_weights[4], k=2)
    assert [doc_id for doc_id, _ in tied] == ["doc04", "doc05"] and tied[0][1] == tied[1][1]
    assert impact.search({"unknown-term": 1.0}) == [] and impact.search({}) == []
    impact.close()


def test_every_term_is_searchable(corpus, index):
    """Terms with punctuation, case differences and non-ASCII letters are indexed as single exact terms."""
    doc_ids, doc_weights, _ = corpus
    impact = ImpactSearcher(index[0])
    for term in TERMS:
        expected = sorted(doc_id for doc_id, w in zip(doc_ids, doc_weights) if quantize(w).get(term))
        assert expected, f"no document holds {term!r}: the check below would compare two empty lists"
        assert sorted(doc_id for doc_id, _ in impact.search({term: 1.0}, k=100)) == expected, term
    impact.close()


def test_rebuild_replaces_index_and_rejects_whitespace_terms(tmp_path):
    index_dir = tmp_path / "index"
    build_impact_index(["a", "b"], [{"x": 1.0}, {"y": 1.0}], index_dir)
    assert build_impact_index(["c"], [{"z": 1.0}], index_dir)["num_docs"] == 1
    assert ImpactSearcher(index_dir).search({"z": 1.0, "x": 1.0}) == [("c", 10000.0)]
    with pytest.raises(ValueError, match="whitespace"):
        build_impact_index(["d"], [{"two words": 1.0}], tmp_path / "other")
    assert not (tmp_path / "other").exists()
