"""Tool `explore` (not a DVC stage): a Gradio app over a run's outputs (library: retrieval/explorer.py).

Live search loads the workspace's searchers once at start: BM25 (data/indexes/bm25), the baseline and fine-tuned
indexes (data/indexes/{baseline,finetuned}) with the encoders they were built with, and the hybrids of params'
``evaluate.fusion``. The tables and curves (wins and losses of fine-tuned over baseline, per-turn / per-field
breakdowns, dvclive's training curves, the metrics) come from the workspace's outputs (data/runs/*.trec,
metrics/evaluate.json, metrics/train/), or with ``--rev`` from a git revision or ``dvc exp`` (read through DVC's
file system, the DVC outputs from the cache). Writes nothing.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import click

from .common import (BM25_INDEX, FORMATTED_QUERIES, INDEX_DIRS, METRICS_DIR, RUNS_DIR, SPLIT_DIR, load_params,
                     params_option, raw_dir, section)

TRAIN_CURVES = METRICS_DIR / "train"
# The stage that writes each output the explorer needs, for the error when it is missing.
WRITTEN_BY = {str(BM25_INDEX): "mine", str(INDEX_DIRS["baseline"]): "index_baseline",
              str(INDEX_DIRS["finetuned"]): "index_finetuned", str(SPLIT_DIR / "test.tsv"): "split",
              str(FORMATTED_QUERIES): "queries", str(RUNS_DIR): "evaluate",
              str(METRICS_DIR / "evaluate.json"): "evaluate"}


def require(path: Path, stage: str | None = None) -> Path:
    if not path.exists():
        stage = stage or WRITTEN_BY.get(str(path), "the pipeline")
        raise click.ClickException(f"{path} is missing in {Path.cwd()}: run `dvc repro {stage}` (or `dvc pull`) "
                                   f"first; the explorer reads a run's outputs")
    return path


def load_explorer(params: dict):
    """The explorer over the workspace's indexes, every searcher loaded once (in the current folder)."""
    from retrieval.bm25 import BM25Searcher
    from retrieval.dataset import load_beir, read_qrels
    from retrieval.explorer import Explorer, Systems, index_searcher
    from retrieval.encoding import using_encoding
    from retrieval.models import get_family

    from .common import read_formatted_queries
    from .encoding import encoding_for

    corpus = load_beir(require(raw_dir(params), "download")).corpus
    qrels = read_qrels(require(SPLIT_DIR / "test.tsv"))
    require(FORMATTED_QUERIES)
    queries = read_formatted_queries()
    bm25 = section(params, "bm25")
    searcher = BM25Searcher(require(BM25_INDEX), k1=float(bm25["k1"]), b=float(bm25["b"]))
    family_name = str(section(params, "model"))
    family = get_family(family_name)
    indexes, encoding = {}, None
    if family.TRAINABLE:
        config = section(params, "models", family_name)
        encoding = encoding_for(params, family_name)
        with using_encoding(encoding):  # where the exports are (each index records which one it was encoded by)
            for system, index_dir in INDEX_DIRS.items():
                indexes[system] = index_searcher(family_name, family, require(index_dir), config)
    evaluate = section(params, "evaluate")
    try:
        systems = Systems(searcher, indexes, evaluate.get("fusion") or [], depth=int(evaluate["depth"]),
                          encoding=encoding)
    except ValueError as error:
        raise click.ClickException(f"params.yaml evaluate.fusion: {error}") from None
    return Explorer(systems, corpus, queries, qrels)


class Outputs:
    """Reads a run's outputs in the workspace, or at a revision (git commit, branch, tag or `dvc exp` name) through
    DVC's file system, which serves the DVC outputs from the cache."""

    def __init__(self, rev: str | None):
        self.rev, self.fs = rev, None
        if rev:
            from dvc.api import DVCFileSystem

            from dvc.exceptions import DvcException

            try:
                self.fs = DVCFileSystem(".", rev=rev)
                self.fs.ls("/")  # the revision is resolved lazily: an unknown one, or no git repository, fails here
            except DvcException as error:
                raise click.ClickException(f"--rev {rev}: cannot read that revision in {Path.cwd()} "
                                           f"({error})") from None

    def exists(self, path: Path) -> bool:
        return self.fs.exists(path.as_posix()) if self.fs else path.exists()

    def text(self, path: Path) -> str | None:
        if not self.exists(path):
            return None
        if self.fs:
            with self.fs.open(path.as_posix(), "r", encoding="utf-8") as stream:
                return stream.read()
        return path.read_text(encoding="utf-8")

    def files_under(self, folder: Path, suffix: str) -> dict[str, str]:
        """{path relative to folder: text} of the files ending in ``suffix`` under ``folder``."""
        if not self.exists(folder):
            return {}
        if self.fs:
            found = [Path(p) for p in self.fs.find(folder.as_posix()) if p.endswith(suffix)]
            paths = [p.relative_to(folder.as_posix().lstrip("/")) if not p.is_absolute() else
                     p.relative_to("/" + folder.as_posix()) for p in found]
        else:
            paths = [p.relative_to(folder) for p in folder.rglob(f"*{suffix}")]
        return {p.as_posix(): self.text(folder / p) for p in sorted(paths)}


def load_panels(outputs: Outputs):
    """The tables and curves, from the workspace's or the revision's outputs."""
    from retrieval.dataset import read_qrels
    from retrieval.explorer import Panels, breakdown_rows, parse_curves, summary_rows, wins_and_losses
    from retrieval.runs import read_trec_run

    where = f"revision {outputs.rev}" if outputs.rev else "the workspace"
    report_text = outputs.text(METRICS_DIR / "evaluate.json")
    if report_text is None:
        raise click.ClickException(f"{METRICS_DIR / 'evaluate.json'} is missing in {where}: run `dvc repro evaluate` "
                                   f"first")
    report = json.loads(report_text)
    train_text = outputs.text(METRICS_DIR / "train.json")
    notes = []
    with tempfile.TemporaryDirectory(prefix="explore-") as scratch:
        def local(path: Path) -> Path | None:  # the readers take paths: a revision's file is copied out first
            if not outputs.rev:
                return path if path.exists() else None
            text = outputs.text(path)
            if text is None:
                return None
            copy = Path(scratch) / path
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(text, encoding="utf-8")
            return copy

        runs = {system: local(RUNS_DIR / f"{system}.trec") for system in ("baseline", "finetuned")}
        qrels_path = local(SPLIT_DIR / "test.tsv")
        queries_path = local(FORMATTED_QUERIES)
        if all(runs.values()) and qrels_path:
            queries = {}
            if queries_path:
                with open(queries_path, encoding="utf-8") as lines:
                    queries = {r["_id"]: r["text"] for r in map(json.loads, filter(str.strip, lines))}
            rows = wins_and_losses(read_qrels(qrels_path), {s: read_trec_run(p) for s, p in runs.items()}, queries)
            note = (f"From {where}'s TREC runs (data/runs, what the evaluate stage scored), against the test qrels: "
                    f"the test queries where the fine-tuned model gains most nDCG@10 over the baseline, and where it "
                    f"loses most ({sum(r['outcome'] == 'win' for r in rows)} wins, "
                    f"{sum(r['outcome'] == 'loss' for r in rows)} losses shown).")
        else:
            rows = []
            note = (f"No baseline and fine-tuned runs in {where} (data/runs/{{baseline,finetuned}}.trec, written by "
                    f"the evaluate stage for a family with something to train), so no wins and losses.")
    curves = parse_curves(outputs.files_under(TRAIN_CURVES / "plots" / "metrics", ".tsv"))
    if outputs.rev:
        notes.append(f"Live search uses the workspace's indexes; the tables and curves are revision {outputs.rev}'s.")
    return Panels(source=f"{where}'s outputs", summary=summary_rows(report), wins_losses=rows, wins_losses_note=note,
                  breakdowns=breakdown_rows(report), curves=curves,
                  train_summary=json.loads(train_text) if train_text else None, notes=notes, report=report)


@click.command("explore")
@params_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to serve on (0.0.0.0: every one).")
@click.option("--port", default=7860, show_default=True, type=click.IntRange(1, 65535), help="Port to serve on.")
@click.option("--rev", default=None, help="Read the tables and curves at this git revision or `dvc exp` name "
                                          "instead of the workspace (live search stays on the workspace's indexes).")
def command(params_path: str, host: str, port: int, rev: str | None) -> None:
    """A Gradio app over this run: any query through every system side by side, with judgements and nDCG@10."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: this may run offline
    from retrieval.explorer import RESULTS_CSS, build_app

    params = load_params(params_path)
    panels = load_panels(Outputs(rev))
    explorer = load_explorer(params)
    click.echo(f"explorer: {len(explorer.test_queries)} test queries, systems {', '.join(explorer.systems.names)}")
    app = build_app(explorer, panels)
    app.queue(default_concurrency_limit=1)  # one search at a time: the searchers are shared and the CPU is small
    app.launch(server_name=host, server_port=port, share=False, show_error=True, inbrowser=False, quiet=False,
               css=RESULTS_CSS, footer_links=["api"])
