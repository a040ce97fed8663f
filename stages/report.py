"""Tool `report` (not a DVC stage): the workspace's metrics against a git revision's, as a Markdown report with PNG
plots, ready to post as a pull-request comment.

Reads metrics/{evaluate,rerank,generalize,train}.json in the workspace and at the revision (``git show``), the
workspace's TREC runs (data/runs/*.trec) and test qrels (data/split/test.tsv) for the recall curves, and writes
``--out``/report.md, ndcg_at_10.png and recall_at_k.png, the folder at once (atomically). Writes nothing DVC tracks.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import click

from retrieval.dataset import read_qrels
from retrieval.io import atomic_dir, write_text
from retrieval.report import (DEFAULT_THRESHOLD, HEADLINE_METRIC, MetricsPair, Plot, draw_metric_bars,
                              draw_recall_curves, metric_changes, recall_curves, recall_mismatches,
                              render_markdown)
from retrieval.runs import read_trec_run

from .common import METRICS_DIR, RUNS_DIR, SPLIT_DIR

FILES = {role: METRICS_DIR / f"{role}.json" for role in ("evaluate", "rerank", "generalize", "train")}
REPORT_FILES = ("report.md", f"{HEADLINE_METRIC}.png", "recall_at_k.png")


def git(*args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", *args], capture_output=True)
    except FileNotFoundError:
        raise click.ClickException("git is not installed: the report compares against a git revision") from None


def resolve_revision(revision: str) -> str:
    """The commit ``revision`` names; a clear error outside a git repository or for an unknown revision."""
    if git("rev-parse", "--is-inside-work-tree").returncode != 0:
        raise click.ClickException(f"{Path.cwd()} is not in a git repository: nothing to compare "
                                   f"--against {revision} with")
    found = git("rev-parse", "--verify", "--quiet", "--end-of-options", f"{revision}^{{commit}}")
    if found.returncode != 0:
        raise click.ClickException(f"unknown git revision {revision!r} (--against): not a branch, tag or commit "
                                   f"of this repository (in CI, fetch it first, e.g. actions/checkout's "
                                   f"fetch-depth: 0)")
    return found.stdout.decode().strip()


def parse_json(text: str, source: str) -> dict:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise click.ClickException(f"{source}: not valid JSON ({error})") from None


def read_workspace(path: Path) -> dict | None:
    return parse_json(path.read_text(encoding="utf-8"), str(path)) if path.is_file() else None


def read_at(commit: str, revision: str, path: Path) -> dict | None:
    """``path`` (relative to the current folder) as committed at ``commit``; None when it is not there."""
    spec = f"{commit}:./{path.as_posix()}"
    if git("cat-file", "-e", spec).returncode != 0:
        return None
    shown = git("show", spec)
    if shown.returncode != 0:
        raise click.ClickException(f"git show {revision}:{path} failed: {shown.stderr.decode().strip()}")
    return parse_json(shown.stdout.decode("utf-8"), f"{revision}:{path}")


def check_out_dir(out: Path) -> None:
    """The report folder is replaced as a whole: refuse one that holds anything but a previous report."""
    if out.exists() and not out.is_dir():
        raise click.ClickException(f"--out {out}: exists and is not a folder")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in REPORT_FILES)
        if others:
            raise click.ClickException(f"--out {out}: the folder is replaced as a whole but holds other files "
                                       f"({', '.join(others[:5])}); choose an empty or new folder")


def recall_plot(folder: Path, evaluate: dict | None) -> Plot:
    title, filename = "Recall@k per system (workspace runs)", "recall_at_k.png"
    runs = sorted(RUNS_DIR.glob("*.trec"))
    qrels_path = SPLIT_DIR / "test.tsv"
    if not runs:
        return Plot(title, None, note=f"no TREC runs in {RUNS_DIR}/ (the evaluate stage writes them)")
    if not qrels_path.is_file():
        return Plot(title, None, note=f"no test qrels at {qrels_path} (the split stage writes them)")
    qrels = read_qrels(qrels_path)
    curves = recall_curves(qrels, {path.stem: read_trec_run(path) for path in runs})
    draw_recall_curves(curves, folder / filename)
    mismatches = recall_mismatches(curves, evaluate, str(FILES["evaluate"]))
    note = (f"**The runs disagree with `{FILES['evaluate']}`** (stale runs?): {'; '.join(mismatches[:5])}."
            if mismatches else f"{len(qrels)} test queries; the curves agree with `{FILES['evaluate']}`'s recall.")
    return Plot(title, filename, note=note)


def make_readable(folder: Path) -> None:
    """The temporary folder and files are private (0700/0600); give the report the usual permissions (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


@click.command("report")
@click.option("--against", "revision", default="main", show_default=True,
              help="Git revision (branch, tag, commit) to compare the workspace with.")
@click.option("--out", "out_dir", default="report", show_default=True, type=click.Path(file_okay=False),
              help="Folder for report.md and its PNG plots (replaced as a whole).")
@click.option("--threshold", default=DEFAULT_THRESHOLD, show_default=True, type=click.FloatRange(min=0),
              help="A system metric that drops by more than this is flagged as a regression.")
def command(revision: str, out_dir: str, threshold: float) -> None:
    """Markdown report of the workspace's metrics against --against's, with plots (for a pull request)."""
    commit = resolve_revision(revision)
    out = Path(out_dir)
    check_out_dir(out)
    files = {role: MetricsPair(str(path), read_workspace(path), read_at(commit, revision, path))
             for role, path in FILES.items()}
    try:
        with atomic_dir(out) as folder:
            changes = [change for role in ("evaluate", "rerank")
                       for change in metric_changes(files[role].workspace, files[role].revision,
                                                    workspace_source=files[role].path,
                                                    revision_source=f"{revision}:{files[role].path}")]
            bars = Plot(f"{HEADLINE_METRIC} per system", None, note=f"no system has {HEADLINE_METRIC}")
            if any(change.metric == HEADLINE_METRIC for change in changes):
                draw_metric_bars(changes, folder / f"{HEADLINE_METRIC}.png", revision=revision)
                bars = Plot(bars.title, f"{HEADLINE_METRIC}.png")
            plots = {"metric_bars": bars, "recall_curves": recall_plot(folder, files["evaluate"].workspace)}
            write_text(render_markdown(files, revision=revision, commit=commit, threshold=threshold, plots=plots),
                       folder / "report.md")
            make_readable(folder)
    except ValueError as error:  # malformed metrics or runs, named by the library's message
        raise click.ClickException(str(error)) from None
    click.echo(str(out / "report.md"))
