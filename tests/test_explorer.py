"""`retrieval explore` (stages/explore.py, retrieval/explorer.py) on a real workspace: the stages run on the tiny
multi-turn dataset with the tiny BERT (a minute), then the app is started on a loopback port and queried with
Gradio's own client and in a headless Chromium (Debian's `chromium` and `chromium-driver`, driven by selenium).

The browser test is skipped when /usr/bin/chromium is missing, unless REQUIRE_BROWSER=1 (CI), where it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tiny import corpus_texts, write_tiny_bert, write_tiny_dataset

ROOT = Path(__file__).resolve().parents[1]
STAGES = (["download"], ["queries"], ["split"], ["mine"], ["export"], ["index", "baseline"], ["train"],
          ["index", "finetuned"], ["evaluate"])
SYSTEMS = ["bm25", "baseline", "finetuned", "hybrid"]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1100"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
pytestmark = pytest.mark.integration


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A run's outputs, from the stages themselves (no git or DVC needed to run them)."""
    work = tmp_path_factory.mktemp("explorer")
    data = write_tiny_dataset(work / "tiny-data", conversations=True)  # turns: evaluate writes by_turn
    model = write_tiny_bert(work / "tiny-model", corpus_texts(data))
    repo = work / "repo"
    repo.mkdir()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["dataset"].update(name="tiny", source="dir", path=str(data))
    params["models"]["dense"].update(base_model=str(model), max_seq_length=64)
    # the best trained epoch even if validation prefers the base model: fine-tuned must differ from the baseline
    params["train"].update(batch_size=8, learning_rate=1e-3, epochs=3, selection="trained")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in STAGES:
        result = run(["retrieval", *stage], repo)
        assert result.returncode == 0, f"retrieval {' '.join(stage)}:\n{result.stderr[-3000:]}"
    return repo


@pytest.fixture(scope="module")
def test_split(workspace):
    from retrieval.dataset import read_qrels

    qrels = read_qrels(workspace / "data/split/test.tsv")
    with open(workspace / "data/queries/queries.jsonl") as lines:
        texts = {r["_id"]: r["text"] for r in map(json.loads, lines)}
    return qrels, {qid: texts[qid] for qid in qrels}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(workspace):
    """`retrieval explore` serving the workspace on a free loopback port, until the module's tests are done."""
    port = free_port()
    log = open(workspace.parent / "explore.log", "w")
    process = subprocess.Popen(["retrieval", "explore", "--port", str(port)], cwd=workspace, env=ENV,
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 300  # a limit on waiting for start-up (models, JVM), not a measurement
    try:
        while True:
            assert process.poll() is None, (workspace.parent / "explore.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the explorer did not start in 300 s"
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def explorer(workspace):
    """The explorer in this process, loaded as the tool loads it (stage code reads paths relative to the cwd)."""
    from stages.common import load_params
    from stages.explore import load_explorer

    cwd = Path.cwd()
    os.chdir(workspace)
    try:
        yield load_explorer(load_params("params.yaml"))
    finally:
        os.chdir(cwd)


def stored_runs(workspace: Path) -> dict:
    from retrieval.runs import read_trec_run

    return {system: read_trec_run(workspace / f"data/runs/{system}.trec") for system in SYSTEMS}


def top10(doc_scores: dict) -> list[str]:
    from retrieval.metrics import ranked

    return ranked(doc_scores)[:10]


def test_search_is_the_familys_search_fused_as_evaluate_fuses(workspace, explorer, test_split):
    """Searchers kept loaded give the rankings of the family's own `search` (which loads them per call), BM25 the
    evaluate stage's, the hybrid params' RRF of those, and nDCG@10 is retrieval.metrics' on the test qrels."""
    from retrieval.encoding import using_encoding
    from retrieval.fusion import fuse_systems
    from retrieval.metrics import per_query
    from retrieval.models import get_family
    from stages.common import load_params
    from stages.encoding import encoding_for

    qrels, texts = test_split
    params = load_params(workspace / "params.yaml")
    config, family = params["models"]["dense"], get_family("dense")
    stored = stored_runs(workspace)
    assert explorer.systems.names == SYSTEMS
    assert set(explorer.test_queries) == set(qrels) and len(qrels) == 12
    for qid, text in texts.items():
        result = explorer.search(text)  # the exact text of a test query is that query
        assert result.qid == qid and result.judged == qrels[qid]
        reference = {"bm25": stored["bm25"][qid]}
        with using_encoding(encoding_for(params, "dense")):
            for system in ("baseline", "finetuned"):
                reference[system] = dict(family.search(workspace / f"data/indexes/{system}", {qid: text}, 100,
                                                       config)[qid])
        reference.update({name: run[qid] for name, run in fuse_systems(
            {s: {qid: r} for s, r in reference.items()}, params["evaluate"]["fusion"]).items()})
        for system in SYSTEMS:
            hits = result.rankings[system]
            assert [h.doc_id for h in hits] == top10(reference[system]), (qid, system)
            assert [h.score for h in hits] == pytest.approx([reference[system][h.doc_id] for h in hits], abs=1e-9)
            assert [h.grade for h in hits] == [qrels[qid].get(h.doc_id) for h in hits]
            assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
            expected = per_query({qid: qrels[qid]}, {qid: reference[system]}, "ndcg_at_10")[qid]
            assert result.ndcg[system] == pytest.approx(expected, abs=1e-12)
        # BM25 is deterministic: the same per-query nDCG as the run evaluate scored
        assert result.ndcg["bm25"] == per_query(qrels, stored["bm25"], "ndcg_at_10")[qid]
    typed = explorer.search("heart artery pressure study")
    assert typed.qid is None and typed.ndcg is None and len(typed.rankings["hybrid"]) == 10
    assert all(h.grade is None for hits in typed.rankings.values() for h in hits)
    picked = explorer.search("anything at all", qid="q0")  # a picked test query is judged whatever its text
    assert picked.qid == "q0" and set(picked.ndcg) == set(SYSTEMS)
    with pytest.raises(ValueError, match="type a query"):
        explorer.search("  ")
    with pytest.raises(ValueError, match="not a test query"):
        explorer.search("heart", qid="no-such-query")


def test_panels_hold_the_runs_and_metrics_of_the_workspace(workspace, test_split):
    from retrieval.metrics import per_query
    from stages.explore import Outputs, load_panels

    qrels, texts = test_split
    cwd = Path.cwd()
    os.chdir(workspace)
    try:
        panels = load_panels(Outputs(None))
    finally:
        os.chdir(cwd)
    stored = stored_runs(workspace)
    finetuned, baseline = (per_query(qrels, stored[s], "ndcg_at_10") for s in ("finetuned", "baseline"))
    deltas = {qid: finetuned[qid] - baseline[qid] for qid in qrels}
    wins = [r for r in panels.wins_losses if r["outcome"] == "win"]
    losses = [r for r in panels.wins_losses if r["outcome"] == "loss"]
    assert len(wins) == min(10, sum(d > 0 for d in deltas.values()))
    assert len(losses) == min(10, sum(d < 0 for d in deltas.values()))
    assert wins or losses, "the tiny run moves some query"
    for row in panels.wins_losses:
        assert row["delta"] == pytest.approx(deltas[row["query_id"]]) and row["query"] == texts[row["query_id"]]
        assert row["finetuned"] == finetuned[row["query_id"]] and row["baseline"] == baseline[row["query_id"]]
    assert [r["delta"] for r in wins] == sorted((r["delta"] for r in wins), reverse=True)
    assert [r["delta"] for r in losses] == sorted(r["delta"] for r in losses)
    assert max(deltas.values()) <= 0 or wins[0]["delta"] == max(deltas.values())

    report = json.loads((workspace / "metrics/evaluate.json").read_text())
    headers, rows = panels.breakdowns["turn"]
    assert headers[:2] == ["turn", "queries"] and len(headers) == 2 + len(SYSTEMS)
    assert [row[0] for row in rows] == list(report["by_turn"]) and sum(row[1] for row in rows) == len(qrels)
    for row in rows:
        assert row[2:] == [report["by_turn"][row[0]][s]["ndcg_at_10"] for s in SYSTEMS]
    headers, rows = panels.summary
    assert headers[1:] == list(report["bm25"])
    assert [row[1] for row in rows] == [report[s]["ndcg_at_10"] for s in SYSTEMS]

    train = json.loads((workspace / "metrics/train.json").read_text())
    assert panels.train_summary == train
    validation = panels.curves["eval/val_ndcg_at_10"]
    assert [value for _, value in validation] == pytest.approx(list(train["val_ndcg_at_10_per_epoch"].values()))
    loss_rows = (workspace / "metrics/train/plots/metrics/loss.tsv").read_text().splitlines()[1:]
    assert panels.curves["loss"] == [(float(a), float(b)) for a, b in (line.split("\t") for line in loss_rows)]
    assert panels.curves["loss"] and all(0 <= step <= train["steps"] for step, _ in panels.curves["loss"])


def test_gradio_client_gets_judged_results_and_ndcg(app_url, test_split, workspace):
    from gradio_client import Client
    from retrieval.metrics import ndcg_at, per_query

    qrels, texts = test_split
    client = Client(app_url, verbose=False)
    assert "/search" in client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    bm25 = per_query(qrels, stored_runs(workspace)["bm25"], "ndcg_at_10")
    for qid in sorted(qrels)[:4]:
        page, table, result = client.predict(texts[qid], "", api_name="/search")
        assert result["qid"] == qid and set(result["rankings"]) == set(SYSTEMS)
        assert {doc: int(grade) for doc, grade in result["judged"].items()} == qrels[qid]
        for system, hits in result["rankings"].items():
            # BM25 ranks only the documents sharing a term with the query: on the tiny corpus fewer than 10
            assert len(hits) == 10 if system != "bm25" else 1 <= len(hits) <= 10
            assert [h["grade"] for h in hits] == [qrels[qid].get(h["doc_id"]) for h in hits]
            # nDCG@10 needs only the top 10: recomputed from what the app returned
            assert result["ndcg"][system] == pytest.approx(ndcg_at([h["doc_id"] for h in hits], qrels[qid], 10))
            judged = [h["doc_id"] for h in hits if h["grade"]]
            for doc in judged:  # marked in the page too
                assert f'class="explorer-hit judged" data-doc-id="{doc}"' in page
        assert result["ndcg"]["bm25"] == bm25[qid]
        rows = {row[0]: row for row in table["data"]}
        assert list(rows) == SYSTEMS
        assert all(rows[s][1] == pytest.approx(result["ndcg"][s], abs=1e-4) for s in SYSTEMS)
        assert all(rows[s][2] == sum(1 for h in result["rankings"][s] if h["grade"]) for s in SYSTEMS)
    # a picked test query (the dropdown's value) is judged even when the text differs
    _, _, picked = client.predict("renal dialysis", "q4", api_name="/search")
    assert picked["qid"] == "q4" and picked["ndcg"] is not None
    _, _, typed = client.predict("renal dialysis filtration", "", api_name="/search")
    assert typed["qid"] is None and typed["ndcg"] is None
    assert typed["rankings"]["bm25"][0]["doc_id"].startswith("kidney")  # the topic's words find its documents
    with pytest.raises(Exception, match="type a query"):
        client.predict("   ", "", api_name="/search")


def browser():
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        reason = (f"no headless browser: {CHROMIUM} or {CHROMEDRIVER} is missing "
                  f"(apt-get install chromium chromium-driver)")
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail(reason + ", and REQUIRE_BROWSER=1")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")  # a fresh profile: nothing from an earlier run
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options), profile


def test_the_page_in_headless_chromium_shows_the_results(app_url, test_split, workspace):
    from retrieval.metrics import ndcg_at
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    qrels, texts = test_split
    report = json.loads((workspace / "metrics/evaluate.json").read_text())
    qid = sorted(qrels)[0]
    driver, profile = browser()
    try:
        driver.get(app_url)
        wait = WebDriverWait(driver, 120)  # how long to wait for the page, not a latency check
        box = wait.until(ready.element_to_be_clickable((By.CSS_SELECTOR, "#query-text textarea")))
        box.send_keys(texts[qid])
        driver.find_element(By.ID, "search-button").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".explorer-system")) == len(SYSTEMS))
        assert driver.find_element(By.CSS_SELECTOR, ".explorer-results").get_attribute("data-qid") == qid
        columns = driver.find_elements(By.CSS_SELECTOR, ".explorer-system")
        assert [c.get_attribute("data-system") for c in columns] == SYSTEMS
        for column in columns:
            hits = column.find_elements(By.CSS_SELECTOR, "li.explorer-hit")
            docs = [h.get_attribute("data-doc-id") for h in hits]
            assert len(docs) == 10 if column.get_attribute("data-system") != "bm25" else 1 <= len(docs) <= 10
            for hit, doc in zip(hits, docs):  # green exactly when judged relevant, with its grade shown
                judged = qrels[qid].get(doc, 0) > 0
                assert ("judged" in hit.get_attribute("class").split()) == judged
                assert (f"judged {qrels[qid][doc]}" in hit.text) if judged else "judged" not in hit.text
            expected = ndcg_at(docs, qrels[qid], 10)
            assert float(column.get_attribute("data-ndcg")) == pytest.approx(expected)
            assert f"nDCG@10 {expected:.3f}" in column.text
        # the wins-and-losses table is rendered with test query ids
        table = driver.find_element(By.ID, "wins-losses")
        assert any(q in table.text for q in qrels)
        # a typed query that is no test query: results, no judgements
        box.clear()
        box.send_keys("pulmonary airway asthma")
        driver.find_element(By.ID, "search-button").click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".explorer-results").get_attribute("data-qid") == "")
        assert "no relevance judgements" in driver.find_element(By.CSS_SELECTOR, ".explorer-note").text
        assert not driver.find_elements(By.CSS_SELECTOR, "li.explorer-hit.judged")
        first = driver.find_element(By.CSS_SELECTOR, '.explorer-system[data-system="bm25"] li.explorer-hit')
        assert first.get_attribute("data-doc-id").startswith("lung")
        # clicking a query id in the wins-and-losses table searches that test query
        shown = next(q for q in sorted(qrels) if f"\n{q}\n" in f"\n{table.text}\n")
        cell = next(e for e in table.find_elements(By.XPATH, f".//*[normalize-space(text())='{shown}']")
                    if e.is_displayed())
        cell.click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".explorer-results").get_attribute("data-qid") == shown)
        assert box.get_attribute("value") == texts[shown]
        assert {e.get_attribute("data-doc-id") for e in driver.find_elements(By.CSS_SELECTOR, "li.explorer-hit.judged")
                } <= {doc for doc, grade in qrels[shown].items() if grade > 0}
        # the per-turn breakdown, switched to another metric of metrics/evaluate.json
        next(e for e in driver.find_elements(By.XPATH, "//button[normalize-space(.)='Breakdowns']")
             if e.is_displayed()).click()
        driver.find_element(By.CSS_SELECTOR, "#breakdown-metric input").click()
        option = "//li[contains(., 'recall_at_5')]"
        wait.until(lambda d: any(e.is_displayed() for e in d.find_elements(By.XPATH, option)))
        next(e for e in driver.find_elements(By.XPATH, option) if e.is_displayed()).click()
        turn_1 = report["by_turn"]["turn_1"]
        wait.until(lambda d: "fine-tuned recall_at_5" in d.find_element(By.ID, "breakdown-turn").text)
        table = driver.find_element(By.ID, "breakdown-turn").text
        assert "turn_1" in table and f"{round(turn_1['hybrid']['recall_at_5'], 4):g}" in table
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_missing_outputs_name_the_stage_to_run(tmp_path, workspace):
    shutil.copy(workspace / "params.yaml", tmp_path / "params.yaml")
    result = run(["retrieval", "explore", "--port", str(free_port())], tmp_path)
    assert result.returncode == 1 and "metrics/evaluate.json is missing" in result.stderr, result.stderr[-2000:]
    assert "dvc repro evaluate" in result.stderr and "Traceback" not in result.stderr
    # the metrics but none of the data: the first input missing names its stage
    shutil.copytree(workspace / "metrics", tmp_path / "metrics")
    result = run(["retrieval", "explore", "--port", str(free_port())], tmp_path)
    assert result.returncode == 1 and "data/raw/tiny is missing" in result.stderr, result.stderr[-2000:]
    assert "dvc repro download" in result.stderr
    shutil.copytree(workspace / "data", tmp_path / "data", ignore=shutil.ignore_patterns("finetuned"))
    result = run(["retrieval", "explore", "--port", str(free_port())], tmp_path)
    assert result.returncode == 1 and "data/indexes/finetuned is missing" in result.stderr, result.stderr[-2000:]
    assert "dvc repro index_finetuned" in result.stderr


def test_rev_reads_the_tables_and_curves_at_a_revision(workspace, tmp_path):
    """`--rev`: the runs (a DVC output, from the cache) and metrics (in git) as committed, not the workspace's."""
    import click
    from stages.explore import Outputs, load_panels

    def panels(folder: Path, rev: str | None):
        cwd = Path.cwd()
        os.chdir(folder)
        try:
            return load_panels(Outputs(rev))
        finally:
            os.chdir(cwd)

    repo = tmp_path / "repo"
    shutil.copytree(workspace, repo)
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "ci@example.com"],
                ["git", "config", "user.name", "ci"], ["dvc", "init", "-q"], ["dvc", "add", "-q", "data/runs"],
                ["git", "add", ".dvc", "data/.gitignore", "data/runs.dvc", "metrics", "data/split", "data/queries"],
                ["git", "commit", "-qm", "a run"]):
        result = run(cmd, repo)
        assert result.returncode == 0, f"{' '.join(cmd)}: {result.stderr[-2000:]}"
    committed = panels(workspace, None)
    assert committed.wins_losses
    # the workspace moves on: the fine-tuned run becomes the baseline's (no wins or losses) and the metrics change
    shutil.copy(repo / "data/runs/baseline.trec", repo / "data/runs/finetuned.trec")
    report = json.loads((repo / "metrics/evaluate.json").read_text())
    report["bm25"]["ndcg_at_10"] = 0.0
    (repo / "metrics/evaluate.json").write_text(json.dumps(report))
    assert panels(repo, None).wins_losses == []
    at_head = panels(repo, "HEAD")
    assert at_head.wins_losses == committed.wins_losses and at_head.summary == committed.summary
    assert at_head.breakdowns == committed.breakdowns and at_head.curves == committed.curves
    assert at_head.train_summary == committed.train_summary and "revision HEAD" in at_head.source
    with pytest.raises(click.ClickException, match="--rev no-such-rev"):
        panels(repo, "no-such-rev")
