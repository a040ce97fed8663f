"""Explorer: one query through every system of a run side by side (BM25, baseline, fine-tuned and the hybrids),
with the judged documents marked and each system's nDCG@10, plus tables and curves read from a run's outputs.

The computation is plain functions and classes (:class:`Systems`, :class:`Explorer`, :func:`wins_and_losses`,
:func:`breakdown_rows`, :func:`training_curves`, :func:`results_html`), tested without a browser; :func:`build_app`
only lays them out in Gradio. Like the rest of the library it knows nothing of DVC or ``params.yaml``: the
``retrieval explore`` tool (``stages/explore.py``) finds the outputs and passes them in.

Every searcher is loaded once (:class:`Systems`): a query costs one BM25 search, one query encoding per trained
index, one faiss search each and the fusion, milliseconds on a CPU, where a family's ``search`` would load its
encoder again on every call.
"""

from __future__ import annotations

import csv
import html
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .fusion import fuse_systems
from .metrics import per_query, ranked

TOP_K = 10
HEADLINE_METRIC = "ndcg_at_10"
# Families whose ``search`` is "the index's embedder + faiss": their encoder and faiss index can be kept loaded and
# searched exactly as ``search`` does (tests/test_explorer.py checks the two agree). Other families are searched
# through ``search`` itself, which reloads the encoder per query (correct, but seconds rather than milliseconds).
VECTOR_FAMILIES = frozenset({"dense", "dpr"})
FAISS_SEARCH_KEYS = ("hnsw_ef_search", "ivf_nprobe")
SYSTEM_LABELS = {"bm25": "BM25", "baseline": "baseline (zero-shot)", "finetuned": "fine-tuned"}
SNIPPET_CHARS = 150

Hits = list[tuple[str, float]]
QuerySearch = Callable[[Mapping[str, str], int], Mapping[str, Hits]]  # ({qid: text}, k) -> {qid: [(doc, score)]}


def system_label(system: str) -> str:
    return SYSTEM_LABELS.get(system, system)


class VectorSearch:
    """A trained index of a vector family, its encoder and faiss index loaded once (the family's ``embedder`` checks
    that the encoder resolves to the weights the index was built with, as ``search`` does)."""

    def __init__(self, family, index_dir: str | Path, config: Mapping):
        from .dense_index import FaissSearcher

        faiss_config = config.get("faiss", {}) or {}
        self.faiss = FaissSearcher(index_dir, **{k: v for k, v in faiss_config.items() if k in FAISS_SEARCH_KEYS})
        self.embedder = family.embedder(index_dir, config)

    def __call__(self, queries: Mapping[str, str], k: int) -> dict[str, Hits]:
        qids = list(queries)
        return self.faiss.batch_search(self.embedder.encode_queries([queries[q] for q in qids]), qids, k)


class FamilySearch:
    """A trained index searched through its family's own ``search`` (families outside VECTOR_FAMILIES)."""

    def __init__(self, family, index_dir: str | Path, config: Mapping):
        self.family, self.index_dir, self.config = family, index_dir, config

    def __call__(self, queries: Mapping[str, str], k: int) -> Mapping[str, Hits]:
        return self.family.search(self.index_dir, queries, k, self.config)


def index_searcher(family_name: str, family, index_dir: str | Path, config: Mapping) -> QuerySearch:
    if family_name in VECTOR_FAMILIES and (Path(index_dir) / "index.faiss").is_file():
        return VectorSearch(family, index_dir, config)
    return FamilySearch(family, index_dir, config)


class Systems:
    """Every system of a run, loaded once: BM25, one searcher per trained index, and the hybrids of ``fusion``
    (``evaluate.fusion``'s specs) fused from their runs at ``depth``, as the evaluate stage fuses them."""

    def __init__(self, bm25, indexes: Mapping[str, QuerySearch], fusion: Sequence[Mapping], *, depth: int = 100,
                 encoding=None):
        self.bm25, self.indexes, self.fusion, self.depth = bm25, dict(indexes), list(fusion), int(depth)
        self.encoding = encoding  # retrieval.encoding.Encoding in force while encoding queries (None: the default)
        self.names = (["bm25"] if bm25 is not None else []) + list(self.indexes)
        probe = {name: {"q": {}} for name in self.names}
        self.names += list(fuse_systems(probe, self.fusion))  # the hybrids whose members are all here

    def runs(self, text: str, qid: str = "query") -> dict[str, dict[str, float]]:
        """``{system: {doc_id: score}}`` for one query, ``depth`` documents per system (hybrids included)."""
        from .encoding import using_encoding

        runs: dict[str, dict[str, dict[str, float]]] = {}
        if self.bm25 is not None:
            runs["bm25"] = {qid: dict(self.bm25.search(text, k=self.depth))}
        with using_encoding(self.encoding) if self.encoding is not None else nullcontext():
            for name, search in self.indexes.items():
                runs[name] = {qid: dict(search({qid: text}, self.depth).get(qid, []))}
        runs.update(fuse_systems(runs, self.fusion))
        return {name: run.get(qid, {}) for name, run in runs.items()}


@dataclass(frozen=True)
class Hit:
    rank: int
    doc_id: str
    score: float
    grade: int | None  # the test qrels' grade; None: not judged for this query
    title: str
    snippet: str


@dataclass(frozen=True)
class QueryResult:
    text: str
    qid: str | None                    # the test query this is (then it is judged), else None
    rankings: dict[str, list[Hit]]     # system -> its top TOP_K
    ndcg: dict[str, float] | None      # system -> nDCG@10 against the test qrels; None for an unjudged query
    judged: dict[str, int] = field(default_factory=dict)  # the query's qrels {doc_id: grade}

    def to_dict(self) -> dict:
        return asdict(self)


def snippet(doc: Mapping, chars: int = SNIPPET_CHARS) -> str:
    text = " ".join(str(doc.get("text") or "").split())
    return text if len(text) <= chars else text[:chars].rsplit(" ", 1)[0] + " ..."


class Explorer:
    """Searches for the app: a typed query, or a test query (``qrels`` judges it, nDCG@10 by retrieval.metrics)."""

    def __init__(self, systems: Systems, corpus: Mapping[str, Mapping], test_queries: Mapping[str, str],
                 qrels: Mapping[str, Mapping[str, int]], *, top_k: int = TOP_K):
        self.systems, self.corpus, self.top_k = systems, corpus, top_k
        # numeric ids in numeric order (SciFact's "2" before "10"), others after them as strings
        order = sorted(qrels, key=lambda qid: (0, int(qid), "") if qid.isdigit() else (1, 0, qid))
        self.test_queries = {qid: test_queries[qid] for qid in order if qid in test_queries}
        self.qrels = qrels
        # a typed text that is a test query's text is that query (its judgements apply)
        self.qid_of_text: dict[str, str] = {}
        for qid, text in self.test_queries.items():
            self.qid_of_text.setdefault(text.strip(), qid)

    def search(self, text: str, qid: str | None = None) -> QueryResult:
        text = (text or "").strip()
        if not text:
            raise ValueError("type a query or pick a test query")
        if qid is not None and qid not in self.qrels:
            raise ValueError(f"{qid!r} is not a test query")
        qid = qid or self.qid_of_text.get(text)
        runs = self.systems.runs(text, qid or "query")
        judged = dict(self.qrels.get(qid, {})) if qid else {}
        rankings = {}
        for system, doc_scores in runs.items():
            rankings[system] = [
                Hit(rank, doc, float(doc_scores[doc]), judged.get(doc) if qid else None,
                    str(self.corpus.get(doc, {}).get("title") or ""), snippet(self.corpus.get(doc, {})))
                for rank, doc in enumerate(ranked(doc_scores)[: self.top_k], start=1)]
        ndcg = None
        if qid:
            ndcg = {system: per_query({qid: judged}, {qid: doc_scores}, HEADLINE_METRIC)[qid]
                    for system, doc_scores in runs.items()}
        return QueryResult(text, qid, rankings, ndcg, judged)

    def query_choices(self, width: int = 90) -> list[tuple[str, str]]:
        """(label, qid) of every test query, for a picker."""
        return [(f"{qid}: {text if len(text) <= width else text[:width] + '...'}", qid)
                for qid, text in self.test_queries.items()]


# --- tables from a run's outputs ---------------------------------------------------------------------------------

def wins_and_losses(qrels: Mapping[str, Mapping[str, int]], runs: Mapping[str, Mapping[str, Mapping[str, float]]],
                    queries: Mapping[str, str], *, better: str = "finetuned", worse: str = "baseline",
                    metric: str = HEADLINE_METRIC, count: int = 10) -> list[dict]:
    """The test queries on which ``better`` gains most over ``worse`` on ``metric`` and those it loses most on, from
    the runs the evaluate stage wrote: ``count`` wins (largest gain first) then ``count`` losses (largest loss
    first); ties by query id. Queries on which the two score the same are in neither."""
    a, b = per_query(qrels, runs[better], metric), per_query(qrels, runs[worse], metric)
    rows = [{"query_id": qid, worse: b[qid], better: a[qid], "delta": a[qid] - b[qid], "query": queries.get(qid, "")}
            for qid in a]  # the text last: a long one would push the numbers out of view
    wins = sorted((r for r in rows if r["delta"] > 0), key=lambda r: (-r["delta"], r["query_id"]))[:count]
    losses = sorted((r for r in rows if r["delta"] < 0), key=lambda r: (r["delta"], r["query_id"]))[:count]
    return [{"outcome": "win", **r} for r in wins] + [{"outcome": "loss", **r} for r in losses]


def summary_rows(report: Mapping, systems: Sequence[str] | None = None) -> tuple[list[str], list[list]]:
    """Headers and rows of every system's means in ``metrics/evaluate.json`` (``{system: {metric: mean}}``)."""
    systems = [s for s in (systems or report) if isinstance(report.get(s), Mapping) and HEADLINE_METRIC in report[s]
               and "_minus_" not in s and "_vs_" not in s]  # the comparisons' entries have the same shape
    metrics = list(report[systems[0]]) if systems else []
    return ["system", *metrics], [[system_label(s), *(report[s].get(m) for m in metrics)] for s in systems]


def breakdown_rows(report: Mapping, metric: str = HEADLINE_METRIC) -> dict[str, tuple[list[str], list[list]]]:
    """Per breakdown field of ``metrics/evaluate.json`` (its ``by_<field>`` entries: per turn position or per query
    field value), headers and rows: group, query count, each system's ``metric``."""
    tables = {}
    for key, groups in report.items():
        if not key.startswith("by_") or not isinstance(groups, Mapping) or not groups:
            continue
        systems = [s for s in next(iter(groups.values())) if s != "num_queries"]
        headers = [key.removeprefix("by_"), "queries", *(f"{system_label(s)} {metric}" for s in systems)]
        tables[key.removeprefix("by_")] = (headers, [
            [group, values.get("num_queries"), *(values.get(s, {}).get(metric) for s in systems)]
            for group, values in groups.items()])
    return tables


def training_curves(folder: str | Path) -> dict[str, list[tuple[float, float]]]:
    """dvclive's curves under ``folder`` (``metrics/train``): ``plots/metrics/<name>.tsv`` files of (step, value)
    rows, keyed by their path without the suffix (``loss``, ``eval/val_ndcg_at_10``, ``learning_rate``...)."""
    root = Path(folder) / "plots" / "metrics"
    return parse_curves({path.relative_to(root).as_posix(): path.read_text(encoding="utf-8")
                         for path in sorted(root.rglob("*.tsv"))})


def parse_curves(files: Mapping[str, str]) -> dict[str, list[tuple[float, float]]]:
    """``{"eval/val_ndcg_at_10.tsv": text}`` (dvclive's TSVs, header then step and value) ->
    ``{"eval/val_ndcg_at_10": [(step, value), ...]}``; files with a header only are left out."""
    curves = {}
    for name in sorted(files):
        rows = list(csv.reader(files[name].splitlines(), delimiter="\t"))
        if len(rows) < 2 or len(rows[0]) < 2:
            continue
        points = []
        for row in rows[1:]:
            try:
                points.append((float(row[0]), float(row[-1])))
            except (ValueError, IndexError):
                raise ValueError(f"{name}: not a (step, value) row: {row!r}") from None
        curves[name.removesuffix(".tsv")] = points
    return curves


# Curves worth a plot (dvclive also logs runtimes and throughput), with their titles.
PLOTTED_CURVES = {"loss": "training loss per step", "eval/val_ndcg_at_10": "validation nDCG@10",
                  "learning_rate": "learning rate"}


def draw_training_curves(curves: Mapping[str, Sequence[tuple[float, float]]]):
    """A matplotlib figure of PLOTTED_CURVES side by side; None when there is none."""
    shown = [(name, title) for name, title in PLOTTED_CURVES.items() if curves.get(name)]
    if not shown:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2 * len(shown), 3.0), layout="constrained")
    for axes, (name, title) in zip(figure.subplots(1, len(shown), squeeze=False)[0], shown):
        steps, values = zip(*curves[name])
        axes.plot(steps, values, marker="o" if len(steps) < 20 else None)
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    return figure


# --- HTML of a query's results -----------------------------------------------------------------------------------

RESULTS_CSS = """
.explorer-grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(230px, 1fr)); gap: 10px; }
.explorer-system { border: 1px solid #d0d7de; border-radius: 8px; padding: 8px 10px; background: #fff; color: #1f2328; }
.explorer-system .explorer-title { margin: 0 0 2px 0; font-size: 15px; font-weight: 700;
  font-family: Arial, "Liberation Sans", Helvetica, sans-serif; }
.explorer-system .explorer-ndcg { font-size: 13px; color: #57606a; margin-bottom: 6px; }
.explorer-system ol { margin: 0; padding-left: 0; list-style: none; }
.explorer-hit { border-top: 1px solid #eaeef2; padding: 5px 0 5px 6px; font-size: 12.5px; line-height: 1.35; }
.explorer-hit.judged { background: #dafbe1; border-left: 4px solid #1a7f37; }
.explorer-hit .explorer-doc { font-weight: 600; }
.explorer-hit .explorer-grade { float: right; font-size: 11px; background: #1a7f37; color: #fff; border-radius: 4px;
  padding: 0 5px; margin-left: 4px; }
.explorer-hit .explorer-score { color: #57606a; font-size: 11px; }
.explorer-hit .explorer-snippet { color: #424a53; }
.explorer-note { font-size: 13px; color: #57606a; margin: 4px 0 8px 0; }
"""


def results_html(result: QueryResult) -> str:
    """The systems side by side; judged documents marked with their grade. ``data-`` attributes carry the values
    (system, nDCG, doc id, grade) so the page can be checked in a browser."""
    esc = html.escape
    if result.qid:
        found = {doc for hits in result.rankings.values() for doc in (h.doc_id for h in hits)}
        relevant = sorted(d for d, g in result.judged.items() if g > 0)
        note = (f"Test query <b>{esc(result.qid)}</b>: {len(relevant)} judged relevant document(s) "
                f"({esc(', '.join(relevant[:8]))}{' ...' if len(relevant) > 8 else ''}); "
                f"{len(found & set(relevant))} of them in some system's top {TOP_K}. Judged documents are green.")
    else:
        note = ("A typed query has no relevance judgements, so no nDCG: pick a test query (or type one's exact text) "
                "to see judged documents and nDCG@10.")
    columns = []
    for system, hits in result.rankings.items():
        value = result.ndcg.get(system) if result.ndcg else None
        ndcg = f"nDCG@10 {value:.3f}" if value is not None else "nDCG@10: not judged"
        items = []
        for hit in hits:
            judged = hit.grade is not None and hit.grade > 0
            grade = f'<span class="explorer-grade">judged {hit.grade}</span>' if judged else ""
            title = f" {esc(hit.title)}" if hit.title else ""
            items.append(
                f'<li class="explorer-hit{" judged" if judged else ""}" data-doc-id="{esc(hit.doc_id)}" '
                f'data-rank="{hit.rank}" data-grade="{hit.grade if hit.grade is not None else ""}">{grade}'
                f'<span class="explorer-doc">{hit.rank}. {esc(hit.doc_id)}</span>{title} '
                f'<span class="explorer-score">({hit.score:.4g})</span><br>'
                f'<span class="explorer-snippet">{esc(hit.snippet)}</span></li>')
        columns.append(
            f'<div class="explorer-system" data-system="{esc(system)}" '
            f'data-ndcg="{"" if value is None else repr(value)}">'
            f'<div class="explorer-title">{esc(system_label(system))}</div>'
            f'<div class="explorer-ndcg">{ndcg}</div><ol>{"".join(items)}</ol></div>')
    return (f'<div class="explorer-results" data-qid="{esc(result.qid or "")}">'
            f'<div class="explorer-note">{note}</div><div class="explorer-grid">{"".join(columns)}</div></div>')


def ndcg_rows(result: QueryResult) -> tuple[list[str], list[list]]:
    """Headers and rows: per system, nDCG@10 (None when not judged) and how many of its top 10 are judged relevant."""
    rows = [[system, None if result.ndcg is None else result.ndcg[system],
             sum(1 for h in hits if h.grade is not None and h.grade > 0)]
            for system, hits in result.rankings.items()]
    return ["system", HEADLINE_METRIC, f"judged relevant in top {TOP_K}"], rows


def rounded(rows: list[list], digits: int = 4) -> list[list]:
    return [[round(v, digits) if isinstance(v, float) and math.isfinite(v) else v for v in row] for row in rows]


# --- the Gradio layout -------------------------------------------------------------------------------------------

@dataclass
class Panels:
    """What the app shows besides live search, read from a run's outputs by the caller."""

    source: str                                   # where they were read, e.g. "workspace" or "revision exp-abc"
    summary: tuple[list[str], list[list]] | None  # summary_rows of metrics/evaluate.json
    wins_losses: list[dict]                       # wins_and_losses of the stored runs ([] when not computable)
    wins_losses_note: str
    breakdowns: dict[str, tuple[list[str], list[list]]]
    curves: dict[str, list[tuple[float, float]]]
    train_summary: dict | None                    # metrics/train.json
    notes: list[str] = field(default_factory=list)
    report: dict = field(default_factory=dict)    # metrics/evaluate.json, for the breakdowns by another metric


def build_app(explorer: Explorer, panels: Panels, *, title: str = "retrieval explore"):
    """The Gradio Blocks app. Its search event is the API endpoint ``/search`` (text, test query id or "")
    -> (results HTML, nDCG table, results as JSON)."""
    import gradio as gr

    def search(text: str, qid: str | None):
        try:
            result = explorer.search(text, qid or None)
        except ValueError as error:
            raise gr.Error(str(error)) from None
        headers, rows = ndcg_rows(result)
        return results_html(result), {"headers": headers, "data": rounded(rows)}, result.to_dict()

    def pick(qid: str | None):
        return explorer.test_queries.get(qid or "", "")

    def pick_row(event):
        row = event.row_value or []
        qid = row[1] if len(row) > 1 else None
        return qid if qid in explorer.test_queries else None

    # set here, not as an annotation: this module's annotations are strings, and Gradio finds the event data
    # parameter by its type
    pick_row.__annotations__ = {"event": gr.SelectData}

    private = {"api_visibility": "private"}  # UI wiring; the one API endpoint is /search
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"# Retrieval explorer\nEvery system of this run on one query: BM25, the zero-shot baseline, "
                    f"the fine-tuned model and the hybrids of `evaluate.fusion`, top {TOP_K} each. "
                    f"Tables below: {html.escape(panels.source)}.")
        with gr.Row():
            text = gr.Textbox(label="Query", placeholder="type a query, or pick a test query", scale=3,
                              elem_id="query-text")
            picked = gr.Dropdown(choices=[("(typed query)", "")] + explorer.query_choices(), value="",
                                 label=f"Test query ({len(explorer.test_queries)})", scale=2, elem_id="test-query")
            button = gr.Button("Search", variant="primary", scale=0, elem_id="search-button")
        results = gr.HTML(elem_id="results")
        with gr.Accordion("nDCG@10 per system, and the results as JSON", open=False):
            ndcg = gr.Dataframe(label="nDCG@10 per system", interactive=False, elem_id="ndcg-table")
            as_json = gr.JSON(label="results")
        with gr.Tabs():
            with gr.Tab("Wins and losses"):
                gr.Markdown(panels.wins_losses_note)
                losses = gr.Dataframe(
                    value=_frame(panels.wins_losses), interactive=False, elem_id="wins-losses", wrap=True,
                    column_widths=["80px", "90px", "100px", "100px", "100px", "auto"],
                    label="test queries: fine-tuned minus baseline nDCG@10 (click a row to search it)")
            with gr.Tab("Training curves"):
                figure = draw_training_curves(panels.curves)
                if figure is not None:
                    gr.Plot(value=figure, label="dvclive (metrics/train)", show_label=False)
                else:
                    gr.Markdown("No training curves in metrics/train (the train stage logs them with dvclive; "
                                "a family with nothing to train has none).")
                if panels.train_summary:
                    gr.JSON(value=panels.train_summary, label="metrics/train.json")
            with gr.Tab("Breakdowns"):
                if not panels.breakdowns:
                    gr.Markdown("No breakdowns in metrics/evaluate.json: `evaluate.breakdowns` found no such field "
                                "on these queries (e.g. `turn` on multi-turn datasets).")
                else:
                    metrics = (panels.summary[0][1:] if panels.summary else []) or [HEADLINE_METRIC]
                    metric = gr.Dropdown(choices=metrics, value=HEADLINE_METRIC if HEADLINE_METRIC in metrics
                                         else metrics[0], label="metric", elem_id="breakdown-metric")
                    tables = [gr.Dataframe(value={"headers": headers, "data": rounded(rows)}, interactive=False,
                                           label=f"by {name} (metrics/evaluate.json by_{name})",
                                           elem_id=f"breakdown-{name}")
                              for name, (headers, rows) in panels.breakdowns.items()]

                    def by_metric(chosen: str):
                        found = breakdown_rows(panels.report, chosen)
                        updated = [{"headers": found[name][0], "data": rounded(found[name][1])}
                                   for name in panels.breakdowns]
                        return updated[0] if len(updated) == 1 else updated  # one output takes a list as its value

                    metric.change(by_metric, metric, tables, **private)
            with gr.Tab("Metrics"):
                if panels.summary:
                    headers, rows = panels.summary
                    gr.Dataframe(value={"headers": headers, "data": rounded(rows)}, interactive=False,
                                 label="metrics/evaluate.json: test-split means")
        for note in panels.notes:
            gr.Markdown(f"*{note}*")

        outputs = [results, ndcg, as_json]
        button.click(search, [text, picked], outputs, api_name="search")
        text.submit(search, [text, picked], outputs, **private)
        # picking a test query fills in its text (what evaluate searched with) and searches it
        picked.input(pick, picked, text, **private).then(search, [text, picked], outputs, **private)
        # typing changes the query: it is no longer the picked test query, unless it is one's exact text
        text.input(lambda: "", None, picked, **private)
        losses.select(pick_row, None, picked, **private).then(pick, picked, text, **private).then(
            search, [text, picked], outputs, **private)
    return app


def _frame(rows: list[dict]) -> dict:
    if not rows:
        return {"headers": ["outcome", "query_id", "baseline", "finetuned", "delta", "query"], "data": []}
    headers = list(rows[0])
    return {"headers": headers, "data": rounded([[row[h] for h in headers] for row in rows])}
