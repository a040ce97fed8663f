"""Integration: the real stage graph under `dvc repro` in a temporary git + DVC repository, on a tiny dataset and
a tiny BERT built here. Slow-ish (a minute or two: JVM and torch start in several stages)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tiny import corpus_texts, write_tiny_bert, write_tiny_dataset

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = {"bm25", "baseline", "finetuned", "hybrid"}
pytestmark = pytest.mark.integration


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("pipeline")
    data = write_tiny_dataset(work / "tiny-data")
    other = write_tiny_dataset(work / "tiny-other", docs_per_topic=4, seed=1)  # the "out-of-domain" collection
    model = write_tiny_bert(work / "tiny-model", corpus_texts(data))
    repo = work / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    for package in ("stages", "retrieval"):
        shutil.copytree(ROOT / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["dataset"].update(name="tiny", source="dir", path=str(data))
    params["models"]["dense"].update(base_model=str(model), max_seq_length=64)
    # three epochs: enough for the tiny model to beat its base on validation (one epoch at this rate does not)
    params["train"].update(batch_size=8, learning_rate=1e-3, epochs=3)
    # The tiny BERT body with a fresh one-score head is the reranker to fine-tune.
    params["rerank"].update(enabled=True, base_model=str(model.parent / "bert"), max_length=64, top_k=10, batch_size=16)
    params["rerank"]["train"].update(batch_size=8, learning_rate=1e-3)
    params["generalize"]["datasets"] = [{"name": "other", "source": "dir", "path": str(other)}]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], repo)
    run(["git", "config", "user.email", "ci@example.com"], repo)
    run(["git", "config", "user.name", "ci"], repo)
    run(["dvc", "init", "-q"], repo)
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")  # the project's own plot templates
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "init"], repo)
    return repo


def assert_report_matches_runs(repo: Path, report: dict, systems) -> None:
    """The metrics in the report are those of the TREC runs the stage wrote, re-scored here against the test qrels,
    and each comparison's figures hang together (the delta inside its interval, Holm never below the raw p)."""
    from retrieval.dataset import read_qrels
    from retrieval.metrics import per_query
    from retrieval.runs import read_trec_run

    qrels = read_qrels(repo / "data/split/test.tsv")
    for system in systems:
        run = read_trec_run(repo / f"data/runs/{system}.trec")
        for metric, mean in report[system].items():
            scores = per_query(qrels, run, metric)
            assert mean == pytest.approx(sum(scores.values()) / len(scores), abs=1e-9), (system, metric)
    for key in [k for k in report if k.endswith("_p_unadjusted")]:
        pair = key.removesuffix("_p_unadjusted")
        a, b = pair.split("_vs_")
        for metric, raw in report[key].items():
            delta = report[f"{a}_minus_{b}"][metric]
            assert delta == pytest.approx(report[a][metric] - report[b][metric])
            assert report[f"{a}_minus_{b}_ci_low"][metric] <= delta + 1e-12 <= report[f"{a}_minus_{b}_ci_high"][metric] + 2e-12
            assert report[f"{pair}_p_value"][metric] >= raw - 1e-12
    # The validation runs are written too (benchmarks/fuse_experiments.py fuses them across experiments) and are
    # what the report's validation means were computed from.
    if "validation" in report:
        val_qrels = {q: g for q, g in read_qrels(repo / "data/split/val.tsv").items() if any(v > 0 for v in g.values())}
        for system in systems:
            run = read_trec_run(repo / f"data/runs/validation/{system}.trec")
            assert run and set(run) <= set(val_qrels)
            for metric, mean in report["validation"][system].items():
                scores = per_query(val_qrels, run, metric)
                assert mean == pytest.approx(sum(scores.values()) / len(scores), abs=1e-9), (system, metric)


def test_repro_evaluates_bm25_baseline_and_finetuned(repo: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run(["dvc", "repro"], repo, env)

    split = json.loads((repo / "metrics/split.json").read_text())
    assert split["shared_groups"] == 0
    assert split["test"]["queries"] == 12 and split["train"]["queries"] + split["val"]["queries"] == 36

    report = json.loads((repo / "metrics/evaluate.json").read_text())
    assert report["num_queries"] == 12
    metrics = set(yaml.safe_load((repo / "params.yaml").read_text())["evaluate"]["metrics"])
    for system in ("bm25", "baseline", "finetuned", "hybrid"):
        assert set(report[system]) == metrics
    assert_report_matches_runs(repo, report, ("bm25", "baseline", "finetuned", "hybrid"))
    # Each query names its document's unique marker word: BM25 must find it near the top.
    assert report["bm25"]["mrr_at_10"] > 0.9
    # params' hybrid is RRF of bm25 and finetuned, compared with finetuned; Holm over both comparisons' metrics.
    assert set(report["hybrid_vs_finetuned_p_value"]) == metrics
    assert report["significance"]["correction"] == "holm" and report["significance"]["comparisons"] == 2 * len(metrics)
    # Validation kept the best of the base model and the epochs (ties keep the earlier), and the fine-tuned system is
    # that model: the base's numbers exactly when the base was kept. (Which one wins on 4 validation queries depends
    # on the tiny model's random vocabulary; a run that must keep the base is the last experiment below.)
    train = json.loads((repo / "metrics/train.json").read_text())
    scores = {"base": train["val_ndcg_at_10_base"],
              **{f"epoch {k.removeprefix('epoch_')}": v for k, v in train["val_ndcg_at_10_per_epoch"].items()}}
    assert len(scores) == 4 and train["kept"] == max(scores, key=scores.get), train
    assert train["kept_base"] == int(train["kept"] == "base")
    assert train["val_ndcg_at_10_best"] == scores[train["kept"]]
    assert (report["finetuned"] == report["baseline"]) == (train["kept"] == "base")
    assert not any("." in key for key in report)
    # What each system's encoder resolved to is in the metrics: the tiny model is a local folder.
    assert report["models"]["baseline"]["source"] == "local" and report["models"]["baseline"]["stand_in"] == 0
    assert report["models"]["finetuned"]["base"]["source"] == "local"
    assert report["models"]["finetuned"]["kept"] == train["kept"]

    reranked = json.loads((repo / "metrics/rerank.json").read_text())
    assert reranked["num_queries"] == 12 and reranked["top_k"] == 10
    for system in ("first_stage", "baseline_reranker", "finetuned_reranker"):
        assert set(reranked[system]) == metrics
        assert (repo / f"data/reranked/{system}.trec").read_text().split()[5] == f"hybrid-{system}"  # reranked hybrid
    # Reranking only reorders the first stage's top 10, so recall at 10 cannot move.
    assert reranked["finetuned_reranker"]["recall_at_10"] == pytest.approx(reranked["first_stage"]["recall_at_10"])
    assert reranked["first_stage"]["ndcg_at_10"] == pytest.approx(report["hybrid"]["ndcg_at_10"])
    assert reranked["significance"]["comparisons"] == 3 * len(metrics)
    assert reranked["models"]["baseline_reranker"]["source"] == "local"
    assert reranked["models"]["finetuned_reranker"]["base"] == reranked["models"]["baseline_reranker"]
    assert json.loads((repo / "metrics/train_reranker.json").read_text())["steps"] >= 1

    # generalize: mteb's figures on the test split are evaluate.json's (int8 vectors: same batches, same vectors),
    # and both systems are compared on the other collection
    general = json.loads((repo / "metrics/generalize.json").read_text())
    check = general["test_split_check"]
    assert check["agrees"] and check["compared"], check
    for system in ("baseline", "finetuned"):
        assert check[system]["evaluate"] == report[system]["ndcg_at_10"] and abs(check[system]["difference"]) <= 1e-4
    assert list(general["datasets"]) == ["tiny (test split)", "other"]
    other = general["datasets"]["other"]
    assert other["num_queries"] == 8 and other["num_docs"] == 32 and other["mteb_agrees"] and not other["in_domain"]
    assert other["delta"] == pytest.approx(other["finetuned"] - other["baseline"])
    assert other["ci_low"] - 1e-4 <= other["delta"] <= other["ci_high"] + 1e-4 and other["p_value"] >= other["p_unadjusted"]
    assert len(list((repo / "data/generalize/mteb/results").rglob("local-other.json"))) == 2  # one per system
    assert json.loads((repo / "metrics/generalize_plot.json").read_text())[-1] == \
        {"dataset": "other", "system": "finetuned", "ndcg_at_10": other["finetuned"]}
    plots = run(["dvc", "plots", "show", "metrics/generalize_plot.json", "-o", "plots-html"], repo, env)
    html = (repo / "plots-html" / "index.html").read_text()
    assert '"xOffset"' in html and "tiny (test split)" in html, plots  # the grouped-bars template, with the data
    shutil.rmtree(repo / "plots-html")
    # a broken collection stops the stage with its file and line, and the last good outputs stay as they were
    broken = repo.parent / "broken"
    params = yaml.safe_load((repo / "params.yaml").read_text())
    shutil.copytree(params["generalize"]["datasets"][0]["path"], broken)
    with open(broken / "corpus.jsonl", "a") as corpus:
        corpus.write('{"_id": "x", "text": \n')
    bad_line = len((broken / "corpus.jsonl").read_text().splitlines())
    params["generalize"]["datasets"] = [{"name": "broken", "source": "dir", "path": str(broken)}]
    (repo / "broken-params.yaml").write_text(yaml.safe_dump(params))
    before = (repo / "metrics/generalize.json").read_text()
    failed = subprocess.run(["retrieval", "generalize", "--params", "broken-params.yaml"], cwd=repo, env=env,
                            capture_output=True, text=True)
    assert failed.returncode == 1 and f"corpus.jsonl:{bad_line}:" in failed.stderr, failed.stderr[-2000:]
    assert "Traceback" not in failed.stderr
    assert (repo / "metrics/generalize.json").read_text() == before
    assert (repo / "data/generalize/mteb/results").is_dir()
    (repo / "broken-params.yaml").unlink()
    # every system on the validation queries too (what defaults are chosen on), by the same metrics
    val_queries = {line.split("\t")[0] for line in (repo / "data/split/val.tsv").read_text().splitlines()[1:]
                   if line and int(line.split("\t")[2]) > 0}
    validation = report["validation"]
    assert validation["num_queries"] == len(val_queries) > 0 and set(validation) == SYSTEMS | {"num_queries"}
    assert all(0 <= validation[system]["ndcg_at_10"] <= 1 for system in SYSTEMS)
    assert validation["bm25"] != report["bm25"]  # other queries than the test split's
    # Recall@k curves, one line per system: each point is evaluate.json's Recall@k of that system
    curves = json.loads((repo / "metrics/recall_at_k.json").read_text())
    assert {row["system"] for row in curves} == SYSTEMS and len(curves) == 100 * len(SYSTEMS)
    for row in curves:
        if row["k"] in (5, 20, 100):
            assert row["recall"] == pytest.approx(report[row["system"]][f"recall_at_{row['k']}"], abs=1e-12), row
    run(["dvc", "plots", "show", "metrics/recall_at_k.json", "-o", "plots-html"], repo, env)
    html = (repo / "plots-html" / "index.html").read_text()
    assert '"log"' in html and '"recall"' in html  # the lines-by-system template (log k), with the data
    shutil.rmtree(repo / "plots-html")

    assert train["trained"] == 1 and train["steps"] >= 1 and train["train_loss"] > 0
    assert not (repo / "data/checkpoints/dense").exists()  # the model is saved: nothing left to resume
    assert (repo / "metrics/train/plots/metrics").is_dir()

    # Nothing changed: a second repro runs no stage.
    again = run(["dvc", "repro"], repo, env)
    assert "Running stage" not in again
    # Every file a stage runs is a dependency: a change to the significance tests reruns evaluate and rerank only.
    significance = repo / "retrieval/significance.py"
    original = significance.read_text()
    significance.write_text(original + "\n# edited\n")
    try:
        status = run(["dvc", "status"], repo, env)
        assert "evaluate:" in status and "rerank:" in status and "train:" not in status, status
    finally:
        significance.write_text(original)

    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline run"], repo)
    kept_before = json.loads((repo / "metrics/train.json").read_text())["kept"]
    experiment = run(["dvc", "exp", "run", "-S", "train.epochs=2"], repo, env)
    assert "Running stage 'train'" in experiment and "Running stage 'index_baseline'" not in experiment
    assert "Running stage 'train_reranker'" not in experiment
    # rerank reranks evaluate's runs: it reruns exactly when the kept model changed. When validation kept the base
    # model both times (the tiny model's random vocabulary decides), the runs are the same and DVC skips it.
    kept_after = json.loads((repo / "metrics/train.json").read_text())["kept"]
    assert ("Running stage 'rerank'" in experiment) == (not kept_before == kept_after == "base"), experiment
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env))
    assert any(exp.get("experiments") for exp in shown), "the experiment is listed by dvc exp show"
    diff = run(["dvc", "metrics", "diff", "--json"], repo, env)
    assert "metrics/evaluate.json" in diff or "metrics/train.json" in diff


    # Distillation: the fine-tuned reranker scores the training triplets, train switches to Margin-MSE.
    distilled = run(["dvc", "exp", "run", "-S", "train.distill=true"], repo, env)
    assert "Running stage 'teacher_scores'" in distilled and "Running stage 'train'" in distilled
    assert "Running stage 'train_reranker'" not in distilled
    teacher = json.loads((repo / "data/teacher_scores/info.json").read_text())
    assert teacher["scored"] is True and teacher["teacher"] == "data/models/reranker" and teacher["pairs"] > 0
    train = json.loads((repo / "metrics/train.json").read_text())
    assert train["distilled"] == 1 and train["steps"] >= 1

    # Training that hurts on validation ships the base model, and says so; evaluate then equals the baseline. A rate of
    # 5.0 wrecks the model, but on 4 validation queries against a random base (nDCG ~0.26) a wrecked epoch has been
    # seen to edge past the base by chance (0.276): then that epoch is kept, silently. Either way the kept model is
    # the validation winner (ties keep the earlier), and the message appears exactly when it is the base.
    hurt = run(["dvc", "exp", "run", "-S", "train.distill=false", "-S", "train.learning_rate=5.0"], repo, env)
    train = json.loads((repo / "metrics/train.json").read_text())
    scores = {"base": train["val_ndcg_at_10_base"],
              **{f"epoch {k.removeprefix('epoch_')}": v for k, v in train["val_ndcg_at_10_per_epoch"].items()}}
    assert train["kept"] == max(scores, key=scores.get) and train["kept_base"] == int(train["kept"] == "base"), train
    assert ("no epoch beat the base model on validation" in hurt) == (train["kept"] == "base")
    report = json.loads((repo / "metrics/evaluate.json").read_text())
    assert (report["finetuned"] == report["baseline"]) == (train["kept"] == "base")
    assert report["models"]["finetuned"]["kept"] == train["kept"]


@pytest.mark.parametrize("family", ["bm25", "splade", "dpr", "specter2", "colbert"])
def test_each_family_runs_through_the_same_stages(repo: Path, family: str):
    """`dvc exp run -S model=<family>` trains, indexes and evaluates any family into the same metrics layout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    tiny_bert = str(Path(yaml.safe_load((repo / "params.yaml").read_text())["models"]["dense"]["base_model"]).parent / "bert")
    overrides = {
        "bm25": [],
        "splade": ["-S", "models.splade.base_model=naver/splade-v3", "-S", "models.splade.max_seq_length=64"],
        "dpr": ["-S", f"models.dpr.base_model={tiny_bert}", "-S", "models.dpr.max_seq_length=64"],
        # offline the hub adapters cannot load: null asks for fresh ones (a named adapter that fails is an error)
        "specter2": ["-S", f"models.specter2.base_model={tiny_bert}", "-S", "models.specter2.max_seq_length=64",
                     "-S", "models.specter2.query_adapter=null", "-S", "models.specter2.document_adapter=null"],
        # a plain BERT gets a seeded projection: the tiny ColBERT (PyLate's loss, Voyager index, MaxSim)
        "colbert": ["-S", f"models.colbert.base_model={tiny_bert}", "-S", "models.colbert.document_length=64",
                    "-S", "models.colbert.embedding_size=16", "-S", "train.colbert.learning_rate=0.001"],
    }[family]
    # train.distill back to false and the learning rate back: an earlier test's experiments left them changed in the
    # workspace.
    run(["dvc", "exp", "run", "-S", f"model={family}", "-S", "train.distill=false", "-S", "train.learning_rate=0.001",
         "-S", "train.epochs=1", *overrides], repo, env)
    report = json.loads((repo / "metrics/evaluate.json").read_text())
    assert report["bm25"]["mrr_at_10"] > 0.9
    if family == "bm25":
        assert "baseline" not in report and "finetuned" not in report and "hybrid" not in report
        assert (repo / "data/reranked/first_stage.trec").read_text().split()[5] == "bm25-first_stage"
        assert json.loads((repo / "data/models/finetuned/training.json").read_text())["trained"] is False
    else:
        assert_report_matches_runs(repo, report, ("bm25", "baseline", "finetuned", "hybrid"))
        train = json.loads((repo / "metrics/train.json").read_text())
        assert train["steps"] >= 1 and train["kept"] in ("base", "epoch 1")
        assert report["models"]["finetuned"]["kept"] == train["kept"]
        expected_source = {"splade": "packaged", "specter2": "local+fresh+fresh", "colbert": "local"}.get(family,
                                                                                                      "local+local")
        assert report["models"]["baseline"]["source"] == expected_source, report["models"]
        assert report["models"]["baseline"]["stand_in"] == int(family == "splade")
    general = json.loads((repo / "metrics/generalize.json").read_text())
    if family == "dpr":  # a two-tower Router model: mteb routes through our embedder's towers
        assert general["test_split_check"]["agrees"] and general["datasets"]["other"]["mteb_agrees"], general
    else:
        assert "has no vector encoder" in general["skipped"], general
    if family == "splade":
        assert report["finetuned_index"]["avg_query_terms"] > 0 and report["finetuned_index"]["index_bytes"] > 0
        # A training-only setting (train.<family>) reruns train and what follows, never the baseline index.
        # Another family's training section reruns nothing.
        params_file = repo / "params.yaml"
        saved = params_file.read_text()

        def status_after(edit) -> str:
            params = yaml.safe_load(saved)
            edit(params["train"])
            params_file.write_text(yaml.safe_dump(params, sort_keys=False))
            try:
                return run(["dvc", "status"], repo, env)
            finally:
                params_file.write_text(saved)

        status = status_after(lambda train: train["splade"].update(learning_rate=1e-4))
        assert "train:" in status and "index_baseline:" not in status, status
        status = status_after(lambda train: train["specter2"].update(margin=0.5))
        assert "train:" not in status and "index_baseline:" not in status, status


def test_synthetic_queries_train_without_training_labels(repo: Path):
    """`dvc exp run -S train.source=synthetic`: queries generated from documents (a chat-completions server on
    127.0.0.1 started here), never from a test document, mined, pseudo-labelled by the cross-encoder and trained
    with Margin-MSE; the labelled training queries are not used. Last in this module: it leaves train.source set."""
    from test_synthesis import ChatServer
    import threading

    server = ChatServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    try:
        out = run(["dvc", "exp", "run", "-S", "model=dense", "-S", "train.source=synthetic", "-S", "train.distill=false",
                   "-S", "train.learning_rate=0.001", "-S", "train.epochs=1", "-S", "synthesize.generator=chat",
                   "-S", f"synthesize.chat.base_url={server.base_url}", "-S", "synthesize.chat.model=generator",
                   "-S", "synthesize.documents=20", "-S", "synthesize.queries_per_doc=2"], repo, env)
    finally:
        server.shutdown()
    assert "Running stage 'synthesize'" in out and "Running stage 'teacher_scores'" in out
    synthesized = json.loads((repo / "metrics/synthesize.json").read_text())
    test_docs = {line.split("\t")[1] for line in (repo / "data/split/test.tsv").read_text().splitlines()[1:] if line}
    assert synthesized["test_documents_excluded"] >= len(test_docs) > 0
    assert synthesized["documents"] == 20 and synthesized["generated"] == 40 and synthesized["kept"] > 0
    assert synthesized["queries"] == synthesized["kept"] - synthesized["dropped_round_trip"] > 0
    assert synthesized["queries_checked_against_test_documents"] == synthesized["kept"]
    generator = synthesized["generator"]
    assert (generator["backend"], generator["base_url"], generator["model"]) == ("chat", server.base_url, "generator")
    assert generator["max_document_chars"] == 2000 and len(generator["prompt_sha256"]) == 16
    assert len(server.requests) == 40  # 20 documents x 2 queries
    queries = [json.loads(line) for line in (repo / "data/synthetic/queries.jsonl").read_text().splitlines()]
    assert len(queries) == synthesized["queries"] and not {q["doc_id"] for q in queries} & test_docs
    mined = [json.loads(line) for line in (repo / "data/synthetic/train.jsonl").read_text().splitlines()]
    assert [m["query_id"] for m in mined] == sorted(q["query_id"] for q in queries)
    assert all(m["positives"] == [{"doc_id": m["query_id"].split("-")[1], "grade": 1}] for m in mined)
    teacher = json.loads((repo / "data/teacher_scores/info.json").read_text())
    assert teacher["scored"] and teacher["source"] == "synthetic" and teacher["queries"] == len(mined)
    train = json.loads((repo / "metrics/train.json").read_text())
    # Margin-MSE on the cross-encoder's margins although train.distill is false: synthetic queries have no other label
    assert train["source"] == "synthetic" and train["distilled"] == 1 and train["steps"] >= 1
    assert train["training_examples"] == len(mined)  # one per (generated query, its document): no labelled query
    report = json.loads((repo / "metrics/evaluate.json").read_text())
    assert report["num_queries"] == 12 and "finetuned_vs_baseline_p_value" in report
    assert (repo / "data/synthesis_cache/cache.jsonl").read_text().count("\n") == 20  # one entry per document
