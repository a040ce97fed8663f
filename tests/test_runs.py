"""TREC run files: roundtrip, rank order, malformed input and atomic writes."""

import re

import pytest

from retrieval.metrics import ranked
from retrieval.runs import read_trec_run, write_trec_run

RUN = {
    "q2": {"d1": 0.5, "d2": 1.25, "d10": 1.25, "d9": 1.25, "d3": -0.75},  # ties broken by doc id descending
    "q1": {"a": 3.0},
    "q10": {"x": 0.000001, "y": 12345.678901},
}


def test_roundtrip(tmp_path):
    path = tmp_path / "run.trec"
    write_trec_run(RUN, path, tag="bm25")
    assert read_trec_run(path) == RUN


def test_file_format_and_rank_order(tmp_path):
    path = tmp_path / "out" / "nested" / "run.trec"  # parent folders are created
    write_trec_run(RUN, path, tag="mytag")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == sum(len(docs) for docs in RUN.values())
    rows = [line.split(" ") for line in lines]
    assert all(len(row) == 6 and row[1] == "Q0" and row[5] == "mytag" for row in rows)
    # queries in sorted (string) order
    assert [r[0] for r in rows] == ["q1"] + ["q10"] * 2 + ["q2"] * 5
    q2 = [r for r in rows if r[0] == "q2"]
    assert [r[2] for r in q2] == ranked(RUN["q2"]) == ["d9", "d2", "d10", "d1", "d3"]
    assert [r[3] for r in q2] == ["1", "2", "3", "4", "5"]
    assert [r[4] for r in q2] == ["1.25", "1.25", "1.25", "0.5", "-0.75"]
    assert lines[0] == "q1 Q0 a 1 3.0 mytag"


def test_read_order_follows_file_rank_and_ranked_reproduces_it(tmp_path):
    path = tmp_path / "run.trec"
    write_trec_run(RUN, path, tag="t")
    run = read_trec_run(path)
    # queries in file (sorted string) order, documents in file rank order
    assert list(run) == ["q1", "q10", "q2"]
    assert list(run["q2"]) == ["d9", "d2", "d10", "d1", "d3"] == ranked(run["q2"])
    assert list(run["q10"]) == ["y", "x"] == ranked(run["q10"])


def test_read_skips_blank_lines_and_accepts_tabs(tmp_path):
    path = tmp_path / "run.trec"
    path.write_text("q1 Q0 d1 1 2.5 t\n\n   \nq1\tQ0\td2\t2\t1e-3\tt\nq2 Q0 d1 1 -1 t\n", encoding="utf-8")
    assert read_trec_run(path) == {"q1": {"d1": 2.5, "d2": 0.001}, "q2": {"d1": -1.0}}


def test_empty_run(tmp_path):
    path = tmp_path / "run.trec"
    write_trec_run({}, path, tag="t")
    assert path.read_text() == ""
    assert read_trec_run(path) == {}


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.trec"
    path.write_text("q1 Q0 d1 1 2.5 t\n\nq1 Q0 d2 2 1.0\n", encoding="utf-8")
    with pytest.raises(ValueError) as error:
        read_trec_run(path)
    message = str(error.value)
    assert f"{path}:3:" in message  # blank line 2 still counts
    assert "6 fields" in message and "got 5" in message


def test_non_numeric_score_names_file_and_line(tmp_path):
    path = tmp_path / "bad.trec"
    path.write_text("q1 Q0 d1 1 2.5 t\nq1 Q0 d2 2 high t\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: score 'high' is not a number")):
        read_trec_run(path)


def test_failing_write_leaves_no_file(tmp_path):
    path = tmp_path / "run.trec"
    bad = {"q1": {"d1": 1.0, "d2": 0.5}, "q2": {"d1": "not-a-float"}}  # fails after q1's lines were written
    with pytest.raises((ValueError, TypeError)):
        write_trec_run(bad, path, tag="t")
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind either


def test_failing_write_keeps_previous_file(tmp_path):
    path = tmp_path / "run.trec"
    write_trec_run(RUN, path, tag="good")
    before = path.read_bytes()
    with pytest.raises((ValueError, TypeError)):
        write_trec_run({"q1": {"d1": object()}}, path, tag="bad")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["run.trec"]


def test_overwrite_replaces_content(tmp_path):
    path = tmp_path / "run.trec"
    write_trec_run(RUN, path, tag="a")
    write_trec_run({"q1": {"z": 1.0}}, path, tag="b")
    assert read_trec_run(path) == {"q1": {"z": 1.0}}


def test_near_tied_scores_keep_their_rank_order_after_roundtrip(tmp_path):
    path = tmp_path / "run.trec"
    run = {"q": {"a": 0.8123452, "b": 0.8123449}}  # a ranks first; both print as 0.812345
    write_trec_run(run, path, tag="t")
    assert ranked(read_trec_run(path)["q"]) == ranked(run["q"]) == ["a", "b"]


def test_tag_with_whitespace_is_refused_before_writing(tmp_path):
    path = tmp_path / "run.trec"
    with pytest.raises(ValueError, match="whitespace"):
        write_trec_run(RUN, path, tag="my tag")
    assert not path.exists()
