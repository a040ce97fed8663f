"""retrieval.report (pure functions, against hand-computed values) and the `retrieval report` tool end to end: in a
temporary git + DVC repository its deltas must be `dvc metrics diff main`'s."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from retrieval.evaluation import compare_systems
from retrieval.metrics import evaluate
from retrieval.report import (MetricChange, MetricsPair, Plot, draw_metric_bars, draw_recall_curves,
                              field_changes, generalization_table, metric_changes, paired_comparisons,
                              recall_curves, recall_mismatches, regressions, render_markdown, system_metrics)
from retrieval.runs import write_trec_run
from stages.report import command

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BIN = Path(sys.executable).parent


def evaluate_json(bm25: float, finetuned: float, baseline: float = 0.5) -> dict:
    """A metrics/evaluate.json in compare_systems' layout, values exact in binary (so deltas are hand-checkable)."""
    return {
        "num_queries": 4,
        "bm25": {"ndcg_at_10": bm25, "recall_at_10": 0.75},
        "baseline": {"ndcg_at_10": baseline, "recall_at_10": 0.5},
        "finetuned": {"ndcg_at_10": finetuned, "recall_at_10": 0.875},
        "finetuned_minus_baseline": {"ndcg_at_10": finetuned - baseline, "recall_at_10": 0.375},
        "finetuned_minus_baseline_ci_low": {"ndcg_at_10": 0.0625, "recall_at_10": -0.125},
        "finetuned_minus_baseline_ci_high": {"ndcg_at_10": 0.25, "recall_at_10": 0.5},
        "finetuned_vs_baseline_p_value": {"ndcg_at_10": 0.01, "recall_at_10": 0.2},
        "finetuned_vs_baseline_p_unadjusted": {"ndcg_at_10": 0.005, "recall_at_10": 0.1},
        "finetuned_vs_baseline_t_test_p": {"ndcg_at_10": 0.004, "recall_at_10": 0.09},
        "significance": {"test": "paired_randomization", "correction": "holm", "comparisons": 2,
                         "system_pairs": 1, "samples": 1000, "ci_level": 0.95},
        "models": {"baseline": {"source": "packaged", "stand_in": 0}},
        "by_turn": {"1": {"bm25": {"ndcg_at_10": 0.5}}},
    }


GENERALIZE = {
    "metric": "ndcg_at_10",
    "test_split_check": {"tolerance": 0.0001, "agrees": True},
    "datasets": {
        "scifact (test split)": {"baseline": 0.5, "finetuned": 0.625, "delta": 0.125, "ci_low": 0.0625,
                                 "ci_high": 0.25, "p_value": 0.02, "num_queries": 300, "in_domain": True},
        "cisi": {"baseline": 0.5, "finetuned": 0.4375, "delta": -0.0625, "ci_low": -0.125, "ci_high": 0.0,
                 "p_value": 0.4, "num_queries": 76, "in_domain": False},
    },
}


# ---------------------------------------------------------------------------------------------------------------
# Metric dicts


def test_system_metrics_leaves_out_comparisons_and_other_entries():
    systems = system_metrics(evaluate_json(0.625, 0.75), "evaluate.json")
    assert list(systems) == ["bm25", "baseline", "finetuned"]
    assert systems["finetuned"] == {"ndcg_at_10": 0.75, "recall_at_10": 0.875}


def test_metric_changes_are_workspace_minus_revision():
    ours, theirs = evaluate_json(bm25=0.625, finetuned=0.75), evaluate_json(bm25=0.625, finetuned=0.875)
    del theirs["bm25"]  # a system only in the workspace
    theirs["old_system"] = {"ndcg_at_10": 0.25}  # and one only at the revision
    changes = {(c.system, c.metric): c for c in metric_changes(ours, theirs, workspace_source="w",
                                                                revision_source="r")}
    assert [key for key in changes] == [("bm25", "ndcg_at_10"), ("bm25", "recall_at_10"),
                                        ("baseline", "ndcg_at_10"), ("baseline", "recall_at_10"),
                                        ("finetuned", "ndcg_at_10"), ("finetuned", "recall_at_10"),
                                        ("old_system", "ndcg_at_10")]
    assert changes["finetuned", "ndcg_at_10"].delta == -0.125  # 0.75 - 0.875
    assert changes["finetuned", "recall_at_10"].delta == 0.0
    assert changes["bm25", "ndcg_at_10"].delta is None and changes["bm25", "ndcg_at_10"].workspace == 0.625
    assert changes["old_system", "ndcg_at_10"].workspace is None
    assert metric_changes(None, theirs, workspace_source="w", revision_source="r")[0].workspace is None


def test_a_non_finite_metric_is_an_error_naming_the_file():
    broken = evaluate_json(0.5, 0.5)
    broken["bm25"]["ndcg_at_10"] = float("nan")
    with pytest.raises(ValueError, match=r"main:metrics/evaluate.json: bm25.ndcg_at_10 must be a finite number"):
        metric_changes(None, broken, workspace_source="w", revision_source="main:metrics/evaluate.json")


def test_regressions_threshold_edge():
    exactly = MetricChange("finetuned", "ndcg_at_10", workspace=0.5, revision=0.75)  # delta -0.25, exact
    more = MetricChange("bm25", "ndcg_at_10", workspace=0.5, revision=0.8125)         # delta -0.3125
    better = MetricChange("baseline", "ndcg_at_10", workspace=0.75, revision=0.5)
    missing = MetricChange("hybrid", "ndcg_at_10", workspace=None, revision=0.75)
    changes = [exactly, more, better, missing]
    assert regressions(changes, 0.25) == [more]  # a drop of exactly the threshold is not flagged
    assert regressions(changes, 0.125) == [exactly, more]
    assert regressions(changes, 0) == [exactly, more]
    with pytest.raises(ValueError, match="threshold"):
        regressions(changes, -0.1)


def test_paired_comparisons():
    rows = paired_comparisons(evaluate_json(0.625, 0.75), "evaluate.json")
    assert [(r.a, r.b, r.metric) for r in rows] == [("finetuned", "baseline", "ndcg_at_10"),
                                                    ("finetuned", "baseline", "recall_at_10")]
    ndcg, recall = rows
    assert (ndcg.delta, ndcg.ci_low, ndcg.ci_high, ndcg.p_value, ndcg.p_unadjusted) == (0.25, 0.0625, 0.25, 0.01,
                                                                                         0.005)
    assert ndcg.significant  # p <= 0.05 and the interval excludes 0
    assert not recall.significant  # p 0.2, interval [-0.125, 0.5]


def test_paired_comparisons_of_the_rerank_layout():
    rerank = {"first_stage": {"ndcg_at_10": 0.5}, "baseline_reranker": {"ndcg_at_10": 0.625},
              "finetuned_reranker": {"ndcg_at_10": 0.75}, "top_k": 20}
    for a, b in (("baseline_reranker", "first_stage"), ("finetuned_reranker", "first_stage"),
                 ("finetuned_reranker", "baseline_reranker")):
        rerank[f"{a}_minus_{b}"] = {"ndcg_at_10": rerank[a]["ndcg_at_10"] - rerank[b]["ndcg_at_10"]}
        rerank[f"{a}_vs_{b}_p_value"] = {"ndcg_at_10": 0.5}
    assert list(system_metrics(rerank, "rerank.json")) == ["first_stage", "baseline_reranker", "finetuned_reranker"]
    assert [(r.a, r.b, r.delta) for r in paired_comparisons(rerank, "rerank.json")] == [
        ("baseline_reranker", "first_stage", 0.125), ("finetuned_reranker", "first_stage", 0.25),
        ("finetuned_reranker", "baseline_reranker", 0.125)]


def test_generalization_table():
    table = generalization_table(GENERALIZE, "generalize.json")
    assert table == {
        "scifact (test split)": {"baseline": 0.5, "finetuned": 0.625, "delta": 0.125, "ci_low": 0.0625,
                                 "ci_high": 0.25, "p_value": 0.02},
        "cisi": {"baseline": 0.5, "finetuned": 0.4375, "delta": -0.0625, "ci_low": -0.125, "ci_high": 0.0,
                 "p_value": 0.4},
    }
    with pytest.raises(ValueError, match="'datasets'"):
        generalization_table({"metric": "ndcg_at_10"}, "generalize.json")


def test_field_changes_of_nested_train_metrics():
    ours = {"steps": 30, "train_loss": 0.5, "kept": "epoch 2", "per_epoch": {"epoch_1": 0.5, "epoch_2": 0.75}}
    theirs = {"steps": 27, "train_loss": 0.75, "kept": "epoch 1", "per_epoch": {"epoch_1": 0.5}}
    changes = {c.field: c for c in field_changes(ours, theirs, workspace_source="w", revision_source="r")}
    assert changes["steps"].delta == 3 and changes["train_loss"].delta == -0.25
    assert changes["kept"].delta is None and changes["per_epoch.epoch_2"].revision is None


# ---------------------------------------------------------------------------------------------------------------
# Recall curves


QRELS = {"q1": {"d1": 1, "d2": 2}, "q2": {"d5": 1, "d6": 0}}


def test_recall_curves_two_queries_by_hand():
    run = {"q1": {"d3": 0.9, "d1": 0.8, "d2": 0.1},   # q1: relevant at ranks 2 and 3 -> 0, 1/2, 1
           "q2": {"d6": 0.5, "d5": 0.5}}               # tie: doc id descending, d6 then d5 -> 0, 1, 1
    curves = recall_curves(QRELS, {"x": run, "empty": {}}, cutoffs=[1, 2, 3, 10])
    assert curves["x"] == [0.0, 0.75, 1.0, 1.0]          # ((0+0)/2, (0.5+1)/2, (1+1)/2, ...)
    assert curves["empty"] == [0.0, 0.0, 0.0, 0.0]      # a query missing from a run scores 0
    # the same numbers as the evaluate stage's metrics, to the last bit
    assert curves["x"] == [evaluate(QRELS, run, [f"recall_at_{k}"])[f"recall_at_{k}"] for k in (1, 2, 3, 10)]
    with pytest.raises(ValueError, match="cutoffs"):
        recall_curves(QRELS, {"x": run}, cutoffs=[0, 1])


def test_recall_mismatches_name_stale_runs():
    curves = {"x": [0.0, 0.75, 1.0, 1.0]}
    metrics = {"x": {"recall_at_2": 0.75, "recall_at_3": 0.5}}
    assert recall_mismatches(curves, metrics, "evaluate.json", cutoffs=[1, 2, 3, 10]) == [
        "x recall_at_3: curve 1.0000, file 0.5000"]
    assert recall_mismatches(curves, None, "evaluate.json", cutoffs=[1, 2, 3, 10]) == []


# ---------------------------------------------------------------------------------------------------------------
# Plots and Markdown


def test_plots_are_png_files(tmp_path):
    changes = metric_changes(evaluate_json(0.625, 0.75), evaluate_json(0.625, 0.875), workspace_source="w",
                             revision_source="r")
    draw_metric_bars(changes, tmp_path / "bars.png", revision="main")
    draw_recall_curves({"x": [0.0, 0.75, 1.0]}, tmp_path / "recall.png", cutoffs=[1, 2, 3])
    for name in ("bars.png", "recall.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bars.png", "recall.png"]  # no temporary file left
    with pytest.raises(ValueError, match="nothing to plot"):
        draw_metric_bars(changes, tmp_path / "none.png", revision="main", metric="map_at_100")


def test_markdown_holds_the_expected_rows():
    files = {
        "evaluate": MetricsPair("metrics/evaluate.json", evaluate_json(0.625, 0.75), evaluate_json(0.625, 0.875)),
        "rerank": MetricsPair("metrics/rerank.json", {"reranked": 0}, {"reranked": 0}),
        "generalize": MetricsPair("metrics/generalize.json", GENERALIZE, None),
        "train": MetricsPair("metrics/train.json", {"steps": 30, "kept": "epoch 2"}, {"steps": 27, "kept": "epoch 1"}),
    }
    plots = {"metric_bars": Plot("nDCG@10", "ndcg_at_10.png"),
             "recall_curves": Plot("Recall@k", None, note="no TREC runs")}
    text = render_markdown(files, revision="main", commit="0123456789abcdef", threshold=0.005, plots=plots)
    lines = text.splitlines()
    assert lines[0] == "# Retrieval report: workspace vs `main` (0123456789ab)"
    assert "- `metrics/evaluate.json` finetuned ndcg_at_10: 0.8750 → 0.7500 (**-0.1250**)" in lines
    assert "| finetuned | ndcg_at_10 | 0.8750 | 0.7500 | **-0.1250** ⚠️ regression |" in lines
    assert "| bm25 | recall_at_10 | 0.7500 | 0.7500 | +0.0000 |" in lines
    assert "| finetuned | 0.8750 | 0.7500 | **-0.1250** ⚠️ regression |" in lines  # the nDCG@10 table
    assert "| finetuned − baseline | ndcg_at_10 | **+0.2500** | [+0.0625, +0.2500] | 0.010 | 0.005 |" in lines
    assert "| finetuned − baseline | recall_at_10 | +0.3750 | [-0.1250, +0.5000] | 0.200 | 0.100 |" in lines
    assert "| cisi | 0.5000 | 0.4375 | -0.0625 | [-0.1250, +0.0000] | 0.400 |" in lines
    assert "`metrics/generalize.json`: not at `main` (workspace values only)." in lines
    assert "| steps | 27 | 30 | +3 |" in lines and "| kept | `epoch 1` | `epoch 2` | – |" in lines
    assert "Reranking did not run (`reranked: 0`: `rerank.enabled` is false)." in lines
    assert "![nDCG@10](ndcg_at_10.png)" in lines
    assert "_Recall@k: not drawn (no TREC runs)._" in lines
    assert "Test queries: workspace 4, `main` 4." in text

    quiet = render_markdown({"evaluate": files["evaluate"]}, revision="main", threshold=0.2)
    assert "None: no system metric dropped by more than 0.2 against `main`." in quiet
    assert "## Generalisation" not in quiet and "## Recall@k" not in quiet
    assert "validation queries" not in quiet  # neither side has validation figures


def test_validation_figures_are_shown_but_never_flagged():
    workspace, revision = evaluate_json(0.625, 0.75), evaluate_json(0.625, 0.875)
    workspace["validation"] = {"num_queries": 81, "bm25": {"ndcg_at_10": 0.5}, "hybrid": {"ndcg_at_10": 0.625}}
    revision["validation"] = {"num_queries": 81, "bm25": {"ndcg_at_10": 0.5}, "hybrid": {"ndcg_at_10": 0.75}}
    text = render_markdown({"evaluate": MetricsPair("metrics/evaluate.json", workspace, revision)}, revision="main")
    lines = text.splitlines()
    assert "## ndcg_at_10 on the validation queries" in lines and "81 queries" in text
    assert "| hybrid | 0.7500 | 0.6250 | -0.1250 |" in lines  # shown, not bold, not a regression
    assert "validation" not in text.split("## Regressions")[1].split("##")[0]


# ---------------------------------------------------------------------------------------------------------------
# The tool in a git + DVC repository


def sh(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    """The data rows of the table under ``heading``, as lists of cells."""
    section = markdown.split(heading + "\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows[1:]]


def tiny_runs(shift: float) -> dict:
    """Runs over the QRELS queries; ``shift`` moves d2 in the finetuned run, changing its figures."""
    return {"bm25": {"q1": {"d1": 3.0, "d3": 2.0, "d2": 1.0}, "q2": {"d5": 1.0, "d7": 0.5}},
            "finetuned": {"q1": {"d3": 3.0, "d2": 2.0 + shift, "d1": 1.0}, "q2": {"d7": 1.0, "d5": 0.5}}}


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    sh(["git", "init", "-q", "-b", "main"], repo)
    sh(["git", "config", "user.email", "ci@example.com"], repo)
    sh(["git", "config", "user.name", "ci"], repo)
    sh(["dvc", "init", "-q"], repo)
    (repo / "dvc.yaml").write_text("metrics:\n  - metrics/evaluate.json\n")
    (repo / ".gitignore").write_text("/data/\n/report/\n")
    (repo / "metrics").mkdir()
    metrics = compare_systems(QRELS, tiny_runs(0.0), comparisons=[("finetuned", "bm25")], samples=200)
    (repo / "metrics" / "evaluate.json").write_text(json.dumps(metrics, indent=2))
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "main"], repo)
    # the workspace: a changed finetuned run, its metrics and runs (as the evaluate stage would write them)
    runs = tiny_runs(2.0)
    metrics = compare_systems(QRELS, runs, comparisons=[("finetuned", "bm25")], samples=200)
    metrics["finetuned"]["ndcg_at_10"] += 0.01  # stays consistent with the runs' recall, moves nDCG
    metrics["bm25"]["map_at_100"] -= 0.0625     # a regression
    (repo / "metrics" / "evaluate.json").write_text(json.dumps(metrics, indent=2))
    for system, run in runs.items():
        write_trec_run(run, repo / "data" / "runs" / f"{system}.trec", tag=system)
    (repo / "data" / "split").mkdir(parents=True)
    (repo / "data" / "split" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q, docs in QRELS.items()
                                                  for d, g in docs.items()))
    monkeypatch.chdir(repo)
    return repo


def test_report_deltas_are_dvc_metrics_diff(repo):
    result = CliRunner().invoke(command, ["--against", "main"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(Path("report") / "report.md")
    out = repo / "report"
    assert sorted(p.name for p in out.iterdir()) == ["ndcg_at_10.png", "recall_at_k.png", "report.md"]
    for png in ("ndcg_at_10.png", "recall_at_k.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "![ndcg_at_10 per system](ndcg_at_10.png)" in markdown
    assert "the curves agree with `metrics/evaluate.json`'s recall" in markdown
    assert "**⚠️ 1 system metric dropped by more than 0.005:**" in markdown

    dvc = json.loads(sh(["dvc", "metrics", "diff", "main", "--all", "--json"], repo))["metrics/evaluate.json"]
    rows = table_rows(markdown, "## All metrics (`metrics/evaluate.json`)")
    systems = {key for key in dvc if re.fullmatch(r"(bm25|finetuned)\.[a-z0-9_]+", key)}
    assert {f"{system}.{metric}" for system, metric, *_ in rows} == systems
    changed = 0
    for system, metric, old, new, change in rows:
        figures = dvc[f"{system}.{metric}"]
        assert (old, new) == (f"{figures['old']:.4f}", f"{figures['new']:.4f}")
        assert change.replace("**", "").removesuffix(" ⚠️ regression") == f"{figures['diff']:+.4f}"
        changed += figures["diff"] != 0
    assert changed >= 3  # the workspace really differs from main
    assert [row[:2] for row in rows if row[4].endswith("⚠️ regression")] == [["bm25", "map_at_100"]]
    # and the library's deltas are dvc's to the last bit
    workspace = json.loads((repo / "metrics" / "evaluate.json").read_text())
    at_main = json.loads(sh(["git", "show", "main:metrics/evaluate.json"], repo))
    for c in metric_changes(workspace, at_main, workspace_source="w", revision_source="r"):
        assert c.delta == dvc[f"{c.system}.{c.metric}"]["diff"]

    # a second run replaces the folder; a folder holding something else is refused
    assert CliRunner().invoke(command, ["--against", "main"]).exit_code == 0
    (out / "notes.txt").write_text("mine")
    refused = CliRunner().invoke(command, ["--against", "main"])
    assert refused.exit_code != 0 and "notes.txt" in refused.output


def test_report_without_runs_or_files_at_the_revision(repo):
    (repo / "data" / "runs" / "bm25.trec").unlink()
    (repo / "data" / "runs" / "finetuned.trec").unlink()
    (repo / "metrics" / "train.json").write_text(json.dumps({"steps": 3}))  # not committed at main
    result = CliRunner().invoke(command, ["--against", "main", "--out", "pr", "--threshold", "0.5"])
    assert result.exit_code == 0, result.output
    markdown = (repo / "pr" / "report.md").read_text(encoding="utf-8")
    assert "not drawn (no TREC runs in data/runs/" in markdown
    assert "`metrics/train.json`: not at `main` (workspace values only)." in markdown
    assert "None: no system metric dropped by more than 0.5" in markdown
    assert sorted(p.name for p in (repo / "pr").iterdir()) == ["ndcg_at_10.png", "report.md"]


def test_unknown_revision_and_no_repository(repo, tmp_path, monkeypatch):
    result = CliRunner().invoke(command, ["--against", "no-such-branch"])
    assert result.exit_code != 0 and "unknown git revision 'no-such-branch'" in result.output
    outside = tmp_path / "outside"
    outside.mkdir()
    monkeypatch.chdir(outside)
    result = CliRunner().invoke(command, [])
    assert result.exit_code != 0 and "is not in a git repository" in result.output
    assert not (outside / "report").exists()
