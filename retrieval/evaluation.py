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


def turn_bucket(turn) -> str:
    """Turn positions grouped as MTRAG analyses do: 1, 2, 3-5, 6+ (names without dots for DVC)."""
    turn = int(turn)
    return "turn_1" if turn <= 1 else "turn_2" if turn == 2 else "turn_3_5" if turn <= 5 else "turn_6_plus"


def breakdown(qrels: Qrels, runs: Mapping[str, Run], groups: Mapping[str, str], *,
              metrics: list[str] = DEFAULT_METRICS) -> dict:
    """Per group of queries (e.g. turn bucket or a query field's value): query count and each system's means.
    Queries without a group are left out."""
    members: dict[str, dict] = {}
    for qid in qrels:
        if qid in groups:
            members.setdefault(groups[qid], {})[qid] = qrels[qid]
    return {
        group: {"num_queries": len(group_qrels),
                **{name: {m: sum(s.values()) / len(s) for m in metrics for s in [per_query(group_qrels, run, m)]}
                   for name, run in runs.items()}}
        for group, group_qrels in sorted(members.items())
    }


def group_queries(queries: Mapping[str, dict], field: str) -> dict[str, str]:
    """Query id -> group name for a breakdown field; ``turn`` is bucketed, other fields are used as they are."""
    groups = {}
    for qid, record in queries.items():
        value = record.get(field)
        if value is None or value == "":
            continue
        if field == "turn":
            groups[qid] = turn_bucket(value)
        else:  # MTRAG annotations are lists of labels, e.g. ["PARTIAL"] or ["Factoid", "Explanation"]
            groups[qid] = _key("+".join(map(str, value)) if isinstance(value, list) else str(value))
    return groups


def _key(value: str) -> str:
    """A metrics key without dots or spaces (DVC flattens nested keys with dots)."""
    return "".join(c if c.isalnum() or c in "-_+" else "_" for c in value) or "_"
