"""Evaluation report of several systems on the same queries: per-system means, deltas, confidence intervals and
paired significance tests corrected for multiple comparisons."""

from __future__ import annotations

import numbers
from itertools import accumulate
from typing import Mapping, Sequence

from .metrics import DEFAULT_METRICS, Qrels, Run, per_query, ranked
from .significance import bootstrap_ci, holm_adjust, paired_randomization_test, paired_t_test


def compare_systems(qrels: Qrels, runs: Mapping[str, Run], *, metrics: list[str] = DEFAULT_METRICS,
                    comparisons: list[tuple[str, str]] = (), samples: int = 10000, seed: int = 0,
                    ci_level: float = 0.95) -> dict:
    """Report laid out for ``dvc metrics diff`` (no dots in keys, numbers as values):

    - ``num_queries``: the judged queries every system is scored on;
    - ``{system}: {metric: mean}`` for every run;
    - for each (a, b) in ``comparisons``, each a ``{metric: number}`` dict:
      ``{a}_minus_{b}``: mean(a) - mean(b);
      ``{a}_minus_{b}_ci_low`` / ``{a}_minus_{b}_ci_high``: percentile bootstrap interval (``ci_level``) of that
      difference, resampling queries;
      ``{a}_vs_{b}_p_value``: the headline p, the two-sided paired randomisation test's p Holm-adjusted over
      every (comparison, metric) pair of this report, so "p <= 0.05" bounds the chance of any false claim in it;
      ``{a}_vs_{b}_p_unadjusted``: that randomisation p before the correction;
      ``{a}_vs_{b}_t_test_p``: the paired t-test's p (unadjusted), a secondary figure;
    - ``significance``, only when there are comparisons: ``{"test": "paired_randomization",
      "correction": "holm", "comparisons": number of (comparison, metric) tests corrected together,
      "system_pairs": len(comparisons), "samples": samples, "ci_level": ci_level}``.

    Seeded (``seed``; ``samples`` random draws per test and per interval): the same inputs give the same report.
    """
    if not qrels:
        raise ValueError("no queries with relevance judgements to evaluate")
    _check_comparisons(runs, comparisons)
    scores = {name: {m: per_query(qrels, run, m) for m in metrics} for name, run in runs.items()}
    report: dict = {"num_queries": len(qrels)}
    for name in runs:
        report[name] = {m: sum(s.values()) / len(s) for m, s in scores[name].items()}
    if not comparisons:
        return report
    raw_p = {(a, b, m): paired_randomization_test(scores[a][m], scores[b][m], samples=samples, seed=seed)
             for a, b in comparisons for m in metrics}
    adjusted_p = holm_adjust(raw_p)
    for a, b in comparisons:
        intervals = {m: bootstrap_ci(scores[a][m], scores[b][m], level=ci_level, samples=samples, seed=seed)
                     for m in metrics}
        report[f"{a}_minus_{b}"] = {m: report[a][m] - report[b][m] for m in metrics}
        report[f"{a}_minus_{b}_ci_low"] = {m: intervals[m][0] for m in metrics}
        report[f"{a}_minus_{b}_ci_high"] = {m: intervals[m][1] for m in metrics}
        report[f"{a}_vs_{b}_p_value"] = {m: adjusted_p[a, b, m] for m in metrics}
        report[f"{a}_vs_{b}_p_unadjusted"] = {m: raw_p[a, b, m] for m in metrics}
        report[f"{a}_vs_{b}_t_test_p"] = {m: paired_t_test(scores[a][m], scores[b][m]) for m in metrics}
    report["significance"] = {"test": "paired_randomization", "correction": "holm", "comparisons": len(raw_p),
                              "system_pairs": len(comparisons), "samples": samples, "ci_level": ci_level}
    return report


def _check_comparisons(runs: Mapping[str, Run], comparisons) -> None:
    seen = set()
    for pair in comparisons:
        if len(pair) != 2:
            raise ValueError(f"comparison {pair!r} must be a pair of system names (a, b)")
        for name in pair:
            if name not in runs:
                raise ValueError(f"comparison {pair!r} names system {name!r}, which has no run")
        if tuple(pair) in seen:
            raise ValueError(f"comparison {pair!r} is listed twice")
        seen.add(tuple(pair))
    for name in runs:
        if "." in name:
            raise ValueError(f"system name {name!r} contains a dot, which dvc metrics would read as nesting")


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


RECALL_CUTOFFS = range(1, 101)


def recall_curves(qrels: Qrels, runs: Mapping[str, Run], cutoffs: Sequence[int] = RECALL_CUTOFFS
                  ) -> dict[str, list[float]]:
    """Mean Recall@k over the queries of the qrels for each k in ``cutoffs``, per system: trec_eval's definition
    as in retrieval.metrics (a query missing from a run, or without a relevant document, scores 0), summed in the
    same order, so a point equals ``evaluate(...)["recall_at_k"]`` exactly."""
    if not qrels:
        raise ValueError("no queries with relevance judgements: no recall curves")
    if not cutoffs or any(not isinstance(k, numbers.Integral) or k < 1 for k in cutoffs):
        raise ValueError(f"recall cutoffs must be integers >= 1, got {list(cutoffs)!r}")
    qids = sorted(qrels)
    curves = {}
    for system, run in runs.items():
        points = []  # per query, Recall@k for every cutoff
        for qid in qids:
            grades = qrels[qid]
            relevant = sum(1 for g in grades.values() if g > 0)
            # found[i]: relevant documents among the first i + 1 retrieved
            found = list(accumulate(int(grades.get(doc, 0) > 0) for doc in ranked(run.get(qid, {}))))
            points.append([(found[min(k, len(found)) - 1] / relevant) if relevant and found else 0.0
                              for k in cutoffs])
        curves[system] = [sum(scores[i] for scores in points) / len(qids) for i in range(len(cutoffs))]
    return curves
