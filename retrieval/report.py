"""Pull-request report: one run's metrics against another revision's, as Markdown, with PNG plots.

Pure functions over the metric dicts the stages write (``compare_systems``' layout: ``{system: {metric: mean}}``
plus, per comparison (a, b), ``{a}_minus_{b}``, ``{a}_minus_{b}_ci_low`` / ``_ci_high``, ``{a}_vs_{b}_p_value``,
``_p_unadjusted`` and ``_t_test_p`` entries, each ``{metric: number}``) and over TREC runs; where the dicts come
from (a workspace, ``git show``) is the caller's business.

A change is ``workspace - revision``, the same subtraction as ``dvc metrics diff REV``'s ``diff`` (new - old), so
the report's deltas are dvc's to the last bit. Every metric here is "higher is better" (nDCG, recall, MRR, MAP), so
a regression is a drop of more than the threshold.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from .io import atomic_path
from .evaluation import RECALL_CUTOFFS, recall_curves  # noqa: F401 (recall_curves: part of this module's API)

DEFAULT_THRESHOLD = 0.005
HEADLINE_METRIC = "ndcg_at_10"

# A system's entry is a dict of metric means keyed like "ndcg_at_10" (retrieval.metrics' naming).
_METRIC_NAME = re.compile(r"[a-z][a-z0-9]*_at_[0-9]+")
# The entries compare_systems writes for one comparison (a, b): "{a}" + suffix.format(b=b).
_COMPARISON_SUFFIXES = ("_minus_{b}", "_minus_{b}_ci_low", "_minus_{b}_ci_high", "_vs_{b}_p_value",
                        "_vs_{b}_p_unadjusted", "_vs_{b}_t_test_p")
_SIGNIFICANCE_LEVEL = 0.05


@dataclass(frozen=True)
class MetricsPair:
    """One metrics file in the workspace and at the revision; ``None`` on a side that does not have it."""

    path: str                          # e.g. "metrics/evaluate.json"
    workspace: Mapping | None
    revision: Mapping | None


@dataclass(frozen=True)
class MetricChange:
    """One system's metric in the workspace and at the revision (``None`` where that side has no value)."""

    system: str
    metric: str
    workspace: float | None
    revision: float | None

    @property
    def delta(self) -> float | None:
        """``workspace - revision``: the subtraction ``dvc metrics diff`` makes (new - old)."""
        if self.workspace is None or self.revision is None:
            return None
        return self.workspace - self.revision

    def regressed(self, threshold: float) -> bool:
        """Dropped by more than ``threshold`` (a drop of exactly the threshold is not flagged)."""
        return self.delta is not None and self.delta < -threshold


@dataclass(frozen=True)
class PairedComparison:
    """The workspace's own figures for ``a - b`` on one metric: delta, bootstrap interval, p-values."""

    a: str
    b: str
    metric: str
    delta: float
    ci_low: float | None
    ci_high: float | None
    p_value: float | None              # Holm-adjusted over every test of the file
    p_unadjusted: float | None = None

    @property
    def significant(self) -> bool:
        """p <= 0.05 and an interval that excludes 0 (the two agree on all but borderline cases)."""
        return (self.p_value is not None and self.p_value <= _SIGNIFICANCE_LEVEL and self.ci_low is not None
                and self.ci_high is not None and (self.ci_low > 0 or self.ci_high < 0))


@dataclass(frozen=True)
class FieldChange:
    """One leaf of a metrics file (dotted key, as dvc names it): value in the workspace and at the revision."""

    field: str
    workspace: object
    revision: object

    @property
    def delta(self) -> float | None:
        if _is_number(self.workspace) and _is_number(self.revision):
            return self.workspace - self.revision
        return None


@dataclass(frozen=True)
class Plot:
    """A figure of the report: the PNG's file name in the report folder, or ``None`` with the reason it is not."""

    title: str
    filename: str | None
    note: str = ""


# ---------------------------------------------------------------------------------------------------------------
# Reading the metric dicts


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_number(value, source: str, field: str) -> float:
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"{source}: {field} must be a finite number, got {value!r}")
    return value


def _check_mapping(metrics, source: str) -> Mapping:
    if not isinstance(metrics, Mapping):
        raise ValueError(f"{source}: expected a JSON object at the top level, got {type(metrics).__name__}")
    return metrics


def _metric_dicts(metrics: Mapping, source: str) -> dict[str, Mapping]:
    """Entries laid out as ``{metric: number}``: the systems and the per-metric comparison figures."""
    found = {}
    for key, value in _check_mapping(metrics, source).items():
        if isinstance(value, Mapping) and value and all(_METRIC_NAME.fullmatch(str(m)) for m in value):
            for metric, number in value.items():
                _check_number(number, source, f"{key}.{metric}")
            found[key] = value
    return found


def _comparisons(entries: Mapping[str, Mapping]) -> tuple[list[tuple[str, str]], set[str]]:
    """The comparisons (a, b) among the entries (those with an ``{a}_minus_{b}`` entry, a and b both entries)
    and the names of every entry that belongs to one."""
    pairs = [(a, b) for a in entries for b in entries if a != b and f"{a}_minus_{b}" in entries]
    members = {a + suffix.format(b=b) for a, b in pairs for suffix in _COMPARISON_SUFFIXES} & entries.keys()
    return [(a, b) for a, b in pairs if a not in members and b not in members], members


def system_metrics(metrics: Mapping, source: str) -> dict[str, dict[str, float]]:
    """``{system: {metric: mean}}`` of a report in compare_systems' layout, in file order; comparison entries
    (``a_minus_b``, its interval and p-values), ``num_queries``, ``models`` and breakdowns are left out.

    ``source`` names the file in error messages (e.g. ``main:metrics/evaluate.json``)."""
    entries = _metric_dicts(metrics, source)
    _, members = _comparisons(entries)
    return {name: dict(values) for name, values in entries.items() if name not in members}


def metric_changes(workspace: Mapping | None, revision: Mapping | None, *, workspace_source: str,
                   revision_source: str) -> list[MetricChange]:
    """Every (system, metric) of either side: workspace systems in file order, then those only at the revision."""
    ours = system_metrics(workspace, workspace_source) if workspace is not None else {}
    theirs = system_metrics(revision, revision_source) if revision is not None else {}
    changes = []
    for system in list(ours) + [s for s in theirs if s not in ours]:
        mine, old = ours.get(system, {}), theirs.get(system, {})
        for metric in list(mine) + [m for m in old if m not in mine]:
            changes.append(MetricChange(system, metric, mine.get(metric), old.get(metric)))
    return changes


def regressions(changes: Iterable[MetricChange], threshold: float) -> list[MetricChange]:
    """The changes that dropped by more than ``threshold``."""
    if not (_is_number(threshold) and math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"regression threshold must be a number >= 0, got {threshold!r}")
    return [change for change in changes if change.regressed(threshold)]


def paired_comparisons(metrics: Mapping, source: str) -> list[PairedComparison]:
    """The comparisons a report holds (``{a}_minus_{b}`` with its interval and p-values), per metric."""
    entries = _metric_dicts(metrics, source)
    pairs, _ = _comparisons(entries)
    rows = []
    for a, b in pairs:
        def figures(suffix: str) -> Mapping:
            return entries.get(a + suffix.format(b=b), {})

        low, high = figures("_minus_{b}_ci_low"), figures("_minus_{b}_ci_high")
        p, raw = figures("_vs_{b}_p_value"), figures("_vs_{b}_p_unadjusted")
        for metric, delta in figures("_minus_{b}").items():
            rows.append(PairedComparison(a, b, metric, delta, low.get(metric), high.get(metric), p.get(metric),
                                         raw.get(metric)))
    return rows


def flatten(metrics: Mapping, source: str, prefix: str = "") -> dict[str, object]:
    """Leaves of nested dicts under dotted keys, as ``dvc metrics`` names them (lists are kept as one leaf)."""
    leaves = {}
    for key, value in _check_mapping(metrics, source).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            leaves.update(flatten(value, source, prefix=f"{name}."))
        else:
            leaves[name] = value
    return leaves


def field_changes(workspace: Mapping | None, revision: Mapping | None, *, workspace_source: str,
                  revision_source: str) -> list[FieldChange]:
    """Every leaf of a metrics file on either side (workspace order, then leaves only at the revision)."""
    ours = flatten(workspace, workspace_source) if workspace is not None else {}
    theirs = flatten(revision, revision_source) if revision is not None else {}
    return [FieldChange(field, ours.get(field), theirs.get(field))
            for field in list(ours) + [f for f in theirs if f not in ours]]


_GENERALIZATION_FIELDS = ("baseline", "finetuned", "delta", "ci_low", "ci_high", "p_value")


def generalization_table(metrics: Mapping, source: str) -> dict[str, dict[str, float]]:
    """``{dataset: {field: number}}`` from metrics/generalize.json's ``datasets`` (per collection: ``baseline``,
    ``finetuned``, ``delta`` = finetuned - baseline, ``ci_low`` / ``ci_high`` of it, Holm-adjusted ``p_value``),
    with whichever of those fields each dataset has (other fields are ignored)."""
    datasets = _check_mapping(metrics, source).get("datasets")
    if not isinstance(datasets, Mapping):
        raise ValueError(f"{source}: expected a 'datasets' object mapping dataset names to their figures, "
                         f"got {type(datasets).__name__}")
    table = {}
    for name, figures in datasets.items():
        if not isinstance(figures, Mapping):
            raise ValueError(f"{source}: datasets.{name} must be an object, got {type(figures).__name__}")
        table[name] = {field: _check_number(figures[field], source, f"datasets.{name}.{field}")
                       for field in _GENERALIZATION_FIELDS if field in figures}
    return table


# ---------------------------------------------------------------------------------------------------------------
# Recall@k from TREC runs


def recall_mismatches(curves: Mapping[str, Sequence[float]], metrics: Mapping | None, source: str, *,
                      cutoffs: Sequence[int] = RECALL_CUTOFFS, tolerance: float = 1e-9) -> list[str]:
    """Where the curves disagree with a metrics file's ``recall_at_k`` (e.g. runs older than the metrics):
    one ``"system recall_at_k: curve x, file y"`` per disagreement."""
    if metrics is None:
        return []
    systems = system_metrics(metrics, source)
    problems = []
    for system, curve in curves.items():
        for i, k in enumerate(cutoffs):
            expected = systems.get(system, {}).get(f"recall_at_{k}")
            if expected is not None and abs(curve[i] - expected) > tolerance:
                problems.append(f"{system} recall_at_{k}: curve {curve[i]:.4f}, file {expected:.4f}")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Plots (matplotlib's Agg canvas directly: no pyplot, so no global backend state and no display needed)


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_png(figure, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")  # the temporary name ends in .tmp: say the format


def draw_metric_bars(changes: Sequence[MetricChange], path: str | os.PathLike, *, revision: str,
                     metric: str = HEADLINE_METRIC) -> None:
    """Bars of ``metric`` per system, the revision's beside the workspace's (a side without the value: no bar)."""
    rows = [change for change in changes if change.metric == metric]
    if not rows:
        raise ValueError(f"no system has {metric}: nothing to plot")
    figure = _new_figure(max(5.0, 1.2 * len(rows) + 2), 4.0)
    axes = figure.add_subplot()
    width = 0.4
    for offset, label, values, colour in ((-width / 2, revision, [r.revision for r in rows], "#9e9e9e"),
                                          (width / 2, "workspace", [r.workspace for r in rows], "#1f77b4")):
        positions = [i + offset for i, v in enumerate(values) if v is not None]
        heights = [v for v in values if v is not None]
        bars = axes.bar(positions, heights, width, label=label, color=colour)
        axes.bar_label(bars, fmt="%.3f", fontsize=7)
    axes.set_xticks(range(len(rows)), [r.system for r in rows], rotation=20, ha="right")
    top = max(v for r in rows for v in (r.revision, r.workspace) if v is not None)
    axes.set_ylim(0, top * 1.3 if top > 0 else 1.0)  # headroom for the bar labels and the legend
    axes.set_ylabel(metric)
    axes.set_title(f"{metric}: workspace vs {revision}")
    axes.legend(loc="upper left", ncols=2)
    _save_png(figure, path)


def draw_recall_curves(curves: Mapping[str, Sequence[float]], path: str | os.PathLike, *,
                       cutoffs: Sequence[int] = RECALL_CUTOFFS) -> None:
    """Recall@k against k, one line per system."""
    if not curves:
        raise ValueError("no recall curves to plot")
    figure = _new_figure(6.5, 4.0)
    axes = figure.add_subplot()
    for system, curve in curves.items():
        if len(curve) != len(cutoffs):
            raise ValueError(f"recall curve of {system!r} has {len(curve)} points for {len(cutoffs)} cutoffs")
        axes.plot(list(cutoffs), list(curve), label=system)
    axes.set_xscale("log")  # the interesting part is the first tens of documents
    ticks = [k for k in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if min(cutoffs) <= k <= max(cutoffs)]
    axes.set_xticks(ticks, [str(k) for k in ticks])
    axes.minorticks_off()
    axes.set_xlabel("k (documents retrieved)")
    axes.set_ylabel("Recall@k")
    axes.set_ylim(0, 1.0)
    axes.grid(True, alpha=0.3)
    axes.set_title("Recall@k on the test queries (workspace runs)")
    axes.legend(loc="lower right")
    _save_png(figure, path)


# ---------------------------------------------------------------------------------------------------------------
# Markdown


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _value(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, numbers.Integral):
        return str(value)
    if _is_number(value):
        return f"{value:.4f}"
    return f"`{value}`"


def _change(delta: float | None, flagged: bool = False) -> str:
    if delta is None:
        return "–"
    text = f"{delta:+d}" if isinstance(delta, numbers.Integral) else f"{delta:+.4f}"
    return f"**{text}** ⚠️ regression" if flagged else text


def _p(p: float | None) -> str:
    if p is None:
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _interval(low: float | None, high: float | None) -> str:
    return "–" if low is None or high is None else f"[{low:+.4f}, {high:+.4f}]"


def _table(header: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _presence(pair: MetricsPair, revision: str) -> str | None:
    """A sentence about a side that lacks the file, or None when both have it."""
    if pair.workspace is None and pair.revision is None:
        return f"`{pair.path}`: not in the workspace and not at `{revision}`."
    if pair.revision is None:
        return f"`{pair.path}`: not at `{revision}` (workspace values only)."
    if pair.workspace is None:
        return f"`{pair.path}`: not in the workspace (values at `{revision}` only)."
    return None


def _changes_table(changes: Sequence[MetricChange], revision: str, threshold: float, *,
                   with_metric: bool = True) -> list[str]:
    header = ["system"] + (["metric"] if with_metric else []) + [f"`{revision}`", "workspace", "change"]
    return _table(header, [(c.system,) + ((c.metric,) if with_metric else ())
                           + (_value(c.revision), _value(c.workspace), _change(c.delta, c.regressed(threshold)))
                           for c in changes])


def _significance_lines(pair: MetricsPair) -> list[str]:
    """The workspace file's comparisons with their intervals and p-values; [] when it has none."""
    rows = paired_comparisons(pair.workspace, pair.path)
    if not rows:
        return []
    info = pair.workspace.get("significance")
    info = info if isinstance(info, Mapping) else {}
    level = info.get("ci_level", 0.95)
    level = f"{level * 100:g}%" if _is_number(level) else str(level)
    intro = (f"From `{pair.path}`: {level} bootstrap interval of each difference"
             + (f" ({info['samples']} resamples of the queries)" if "samples" in info else "")
             + "; p from the two-sided paired randomisation test"
             + (f", Holm-corrected over the {info['comparisons']} tests of the file" if "comparisons" in info else "")
             + f" (raw: before the correction). **Bold**: p <= {_SIGNIFICANCE_LEVEL} and an interval excluding 0.")
    table_rows = []
    for row in rows:
        delta = _change(row.delta)
        table_rows.append((f"{row.a} − {row.b}", row.metric, f"**{delta}**" if row.significant else delta,
                           _interval(row.ci_low, row.ci_high), _p(row.p_value), _p(row.p_unadjusted)))
    return [intro, ""] + _table(["comparison", "metric", "difference", f"{level} interval", "p", "raw p"],
                                table_rows)


def _generalization_lines(pair: MetricsPair, revision: str) -> list[str]:
    ours = generalization_table(pair.workspace, pair.path) if pair.workspace is not None else {}
    theirs = generalization_table(pair.revision, f"{revision}:{pair.path}") if pair.revision is not None else {}
    names = list(ours) + [n for n in theirs if n not in ours]
    if not names:
        return [f"`{pair.path}` lists no datasets."]
    metric = (pair.workspace or pair.revision).get("metric", HEADLINE_METRIC)
    compare = bool(ours) and any("finetuned" in figures for figures in theirs.values())
    header = ["dataset", "baseline", "finetuned", "finetuned − baseline", "interval", "p"]
    if compare:
        header += [f"finetuned at `{revision}`", "finetuned change"]
    rows = []
    for name in names:
        mine, old = ours.get(name, {}), theirs.get(name, {})
        row = [name, _value(mine.get("baseline")), _value(mine.get("finetuned")), _change(mine.get("delta")),
               _interval(mine.get("ci_low"), mine.get("ci_high")), _p(mine.get("p_value"))]
        if compare:
            delta = (mine["finetuned"] - old["finetuned"]) if "finetuned" in mine and "finetuned" in old else None
            row += [_value(old.get("finetuned")), _change(delta)]
        rows.append(row)
    lines = [f"`{metric}` on each collection in the workspace (p Holm-corrected over the collections).", ""]
    lines += _table(header, rows)
    check = (pair.workspace or {}).get("test_split_check")
    if isinstance(check, Mapping) and "agrees" in check:
        lines += ["", "mteb's figures on the test split " + ("agree" if check["agrees"] else "**do not agree**")
                  + f" with `metrics/evaluate.json` (tolerance {check.get('tolerance', '?')})."]
    return lines


def _fields_lines(pair: MetricsPair, revision: str) -> list[str]:
    changes = field_changes(pair.workspace, pair.revision, workspace_source=pair.path,
                            revision_source=f"{revision}:{pair.path}")
    if pair.revision is None:
        return _table(["field", "workspace"], [(c.field, _value(c.workspace)) for c in changes])
    return _table(["field", f"`{revision}`", "workspace", "change"],
                  [(c.field, _value(c.revision), _value(c.workspace), _change(c.delta)) for c in changes])


def _plot_lines(plot: Plot | None) -> list[str]:
    if plot is None:
        return []
    if plot.filename is None:
        return [f"_{plot.title}: not drawn ({plot.note})._", ""]
    return [f"![{plot.title}]({plot.filename})", ""] + ([plot.note, ""] if plot.note else [])


def _validation_lines(evaluate: MetricsPair, revision: str) -> list[str]:
    """nDCG@10 of every system on the validation queries (evaluate.json ``validation``), where defaults are chosen:
    shown, never flagged (the fine-tuned model was selected on these queries)."""
    sides = [None if metrics is None else metrics.get("validation") for metrics in (evaluate.workspace, evaluate.revision)]
    if all(side is None for side in sides):
        return []
    rows = [c for c in metric_changes(*sides, workspace_source=f"{evaluate.path} validation",
                                      revision_source=f"{revision}:{evaluate.path} validation")
            if c.metric == HEADLINE_METRIC]
    counts = [side.get("num_queries") for side in sides if side is not None]
    return ([f"## {HEADLINE_METRIC} on the validation queries", "",
             f"What defaults are chosen on (never the test split); {counts[0]} queries. The fine-tuned model was "
             f"selected on them, so its figure is optimistic; the hybrids' are not what selected it.", ""]
            + _table(["system", f"`{revision}`", "workspace", "change"],
                     [(c.system, _value(c.revision), _value(c.workspace), _change(c.delta)) for c in rows]) + [""])


def render_markdown(files: Mapping[str, MetricsPair], *, revision: str, commit: str | None = None,
                    threshold: float = DEFAULT_THRESHOLD, plots: Mapping[str, Plot] = {}) -> str:
    """The report as GitHub-flavoured Markdown.

    ``files`` maps roles to metrics files: ``evaluate`` (required key; its sides may be None), and optionally
    ``rerank``, ``generalize`` and ``train``. ``plots``: ``metric_bars`` and ``recall_curves``, linked by file name
    relative to the report. Regressions are the system metrics of ``evaluate`` and ``rerank`` that dropped by more
    than ``threshold``.
    """
    at = f"`{revision}`" + (f" ({commit[:12]})" if commit and commit != revision else "")
    ranked_files = [(role, files[role]) for role in ("evaluate", "rerank") if files.get(role) is not None]
    changes = {role: metric_changes(pair.workspace, pair.revision, workspace_source=pair.path,
                                    revision_source=f"{revision}:{pair.path}") for role, pair in ranked_files}
    flagged = [(files[role].path, c) for role, rows in changes.items() for c in regressions(rows, threshold)]

    lines = [f"# Retrieval report: workspace vs {at}", "",
             f"Changes are workspace − {at}: the `diff` column of `dvc metrics diff {revision}`. A regression is a "
             f"system metric that dropped by more than {threshold:g}. A change has no interval or p-value: the "
             f"metrics files hold no per-query scores of `{revision}`; the intervals and p-values below compare "
             f"systems within the workspace."]
    evaluate = files["evaluate"]
    counts = {side: metrics.get("num_queries") for side, metrics in (("workspace", evaluate.workspace),
                                                                     (f"`{revision}`", evaluate.revision))
              if metrics is not None and _is_number(metrics.get("num_queries"))}
    if counts:
        lines += ["", "Test queries: " + ", ".join(f"{side} {n}" for side, n in counts.items()) + "."
                  + (" **The test sets differ: the changes compare different queries.**"
                     if len(set(counts.values())) > 1 else "")]
    lines.append("")

    lines += ["## Regressions", ""]
    if flagged:
        lines += [f"**⚠️ {len(flagged)} system metric{'s' if len(flagged) > 1 else ''} dropped by more than "
                  f"{threshold:g}:**", ""]
        lines += [f"- `{path}` {c.system} {c.metric}: {_value(c.revision)} → {_value(c.workspace)} "
                  f"(**{c.delta:+.4f}**)" for path, c in flagged]
    else:
        lines += [f"None: no system metric dropped by more than {threshold:g} against `{revision}`."]
    lines.append("")

    headline = [c for rows in changes.values() for c in rows if c.metric == HEADLINE_METRIC]
    lines += [f"## {HEADLINE_METRIC} per system", ""]
    if headline:
        lines += _changes_table(headline, revision, threshold, with_metric=False) + [""]
    lines += _plot_lines(plots.get("metric_bars"))

    lines += _validation_lines(evaluate, revision)

    for title, role in (("All metrics", "evaluate"), ("Reranking", "rerank")):
        pair = files.get(role)
        if pair is None:
            continue
        lines += [f"## {title} (`{pair.path}`)", ""]
        note = _presence(pair, revision)
        if note:
            lines += [note, ""]
        if changes[role]:
            lines += _changes_table(changes[role], revision, threshold) + [""]
        elif pair.workspace is not None or pair.revision is not None:
            ran = (pair.workspace if pair.workspace is not None else pair.revision).get("reranked")
            lines += [("Reranking did not run (`reranked: 0`: `rerank.enabled` is false)." if ran == 0
                       else f"`{pair.path}` holds no system metrics."), ""]

    significance = [_significance_lines(pair) for _, pair in ranked_files if pair.workspace is not None]
    significance = [block for block in significance if block]
    if significance:
        lines += ["## Confidence intervals and p-values (workspace)", ""]
        for block in significance:
            lines += block + [""]

    if "recall_curves" in plots:
        lines += ["## Recall@k", ""] + _plot_lines(plots["recall_curves"])

    for title, role, body in (("Generalisation", "generalize", _generalization_lines),
                              ("Training", "train", _fields_lines)):
        pair = files.get(role)
        if pair is None or (pair.workspace is None and pair.revision is None):
            continue  # optional files: no section when neither side has one
        lines += [f"## {title} (`{pair.path}`)", ""]
        note = _presence(pair, revision)
        if note:
            lines += [note, ""]
        if pair.workspace is not None or role == "train":
            lines += body(pair, revision) + [""]
    return "\n".join(lines).rstrip() + "\n"
