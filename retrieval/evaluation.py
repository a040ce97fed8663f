"""Evaluation report of several systems on the same queries: per-system means, deltas and paired p-values."""

from __future__ import annotations

from typing import Mapping

from .metrics import DEFAULT_METRICS, Qrels, Run, per_query
from .significance import paired_t_test


def compare_systems(qrels: Qrels, runs: Mapping[str, Run], *, metrics: list[str] = DEFAULT_METRICS,
                    comparisons: list[tuple[str, str]] = ()) -> dict:
    """Report laid out for ``dvc metrics diff``: ``{system: {metric: mean}}``, and for each (a, b) comparison
    ``{a}_minus_{b}: {metric: delta}`` and ``{a}_vs_{b}_p_value: {metric: p}`` (two-sided paired t-test)."""
    if not qrels:
        raise ValueError("no queries with relevance judgements to evaluate")
    scores = {name: {m: per_query(qrels, run, m) for m in metrics} for name, run in runs.items()}
    report: dict = {"num_queries": len(qrels)}
    for name in runs:
        report[name] = {m: sum(s.values()) / len(s) for m, s in scores[name].items()}
    for a, b in comparisons:
        report[f"{a}_minus_{b}"] = {m: report[a][m] - report[b][m] for m in metrics}
        report[f"{a}_vs_{b}_p_value"] = {m: paired_t_test(scores[a][m], scores[b][m]) for m in metrics}
    return report
