"""Hybrid retrieval: fuse two or more runs ``{query_id: {doc_id: score}}`` into one, in the style of ranx.

The formulas are ranx's (``ranx.fusion.rrf``, ``ranx.fusion.wsum``, ``ranx.normalization``), written here in plain
Python rather than called, because ranx's fusion does not fit this project:
* it ranks a query's documents with an unstable ``np.argsort`` on the score, so tied documents get an arbitrary
  rank (RRF then depends on dict insertion order), where trec_eval, and ``retrieval.metrics.ranked``, break ties
  by doc id descending;
* ``ranx.fuse`` refuses runs whose query ids differ (an ``AssertionError``), though a sparse and a dense run
  routinely differ (a query that matched no term, a run cut to a subset);
* its numba kernels take ~45 s to compile in a fresh environment and several seconds per process even when cached,
  for arithmetic that takes milliseconds here.
Where ranx is well defined (no ties, same queries, same documents or min-max) the results agree:
``tests/test_fusion.py`` checks it.

Conventions:
* A query is fused over the runs that hold it: a run without it, or with no documents for it, contributes nothing
  (like a run that retrieved nothing for it).
* RRF is rank-based: a document missing from a run contributes nothing from that run, which is what it means to
  have no rank there, whatever the run's score range.
* Weighted sum: a document missing from a run that holds the query gets that run's *minimum* normalised score for
  the query, i.e. it counts as no better than the worst document the run retrieved. (ranx gives it 0, which is the
  same for min-max and sum but wrong for scores that can be negative, such as SPECTER2's ``-l2``, where 0 would
  outrank every retrieved document, and arbitrary for unnormalised scores.)
* Output queries are sorted and each query's documents are in trec order.

Where each per-query normalisation is defined (``UndefinedFusion``, a ``ValueError`` naming the normalisation, the
run and the query, is raised outside it, rather than dividing by ranx's 1e-9 floor; inside it there is no floor, so a
range of 1e-12 still maps min-max to [0, 1]):
* every normalisation needs finite scores (an infinity makes its formula NaN); RRF needs no NaN (it has no rank);
* ``min-max`` ``(s - min) / (max - min)`` and ``zmuv`` ``(s - mean) / std``: any finite scores;
* ``sum`` ``(s - min) / sum(s - min)``: any finite scores (the total after shifting by the minimum is positive
  unless all scores are equal);
* ``max`` ``s / max``: scores >= 0 with a positive maximum. With a maximum <= 0 it divides by zero or flips the
  order; with some negative scores it no longer maps to [0, 1] but to [min / max, 1], which can be any width, so
  the weights no longer mean what they say. Use min-max or zmuv for such runs;
* ``none``: any finite scores.
When all of a run's scores for a query are equal (e.g. it retrieved one document), min-max, sum and zmuv are 0/0:
they normalise every score to 0, as ranx does. That is the right answer, not just a convention: the run cannot
tell those documents apart, and since the documents it misses get its minimum, 0, too, it adds the same to every
document of the query and leaves the order to the other runs. (``max`` gives those scores 1, and missing ones 1.)
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, Mapping, Sequence

from retrieval.metrics import ranked

Run = Mapping[str, Mapping[str, float]]


class UndefinedFusion(ValueError):
    """A run's scores for one query are outside what a fusion method or normalisation is defined for.

    ``position`` is the run's 1-based position in the list of runs; ``fuse_systems`` adds the run's name.
    """

    def __init__(self, method: str, position: int, qid: str, reason: str):
        self.method, self.position, self.qid, self.reason = method, position, qid, reason
        super().__init__(self.message())

    def message(self, run_name: str | None = None) -> str:
        run = f"run {self.position}" + (f" ({run_name!r})" if run_name else "")
        return f"{self.method} is undefined for {run} query {self.qid!r}: {self.reason}"


def _min_max(scores: list[float]) -> Callable[[float], float]:
    low, high = min(scores), max(scores)
    if low == high:  # 0/0: see the module docstring
        return lambda s: 0.0
    return lambda s: (s - low) / (high - low)


def _max(scores: list[float]) -> Callable[[float], float]:
    high = max(scores)  # > 0: checked by _max_undefined
    return lambda s: s / high


def _sum(scores: list[float]) -> Callable[[float], float]:
    low = min(scores)
    total = math.fsum(s - low for s in scores)
    if total == 0:  # all scores equal
        return lambda s: 0.0
    return lambda s: (s - low) / total


def _zmuv(scores: list[float]) -> Callable[[float], float]:
    if min(scores) == max(scores):  # std 0; tested directly, as a rounded mean can leave a std of ~1e-17
        return lambda s: 0.0
    mean = math.fsum(scores) / len(scores)
    std = math.sqrt(math.fsum((s - mean) ** 2 for s in scores) / len(scores))  # population std, as np.std
    return lambda s: (s - mean) / std


def _max_undefined(scores: list[float]) -> str | None:
    if max(scores) <= 0:
        return "its scores are <= 0 (use min-max or zmuv)"
    if min(scores) < 0:
        return f"it has negative scores, down to {min(scores):g} (use min-max or zmuv)"
    return None


def _non_finite(doc_scores: Mapping[str, float]) -> str | None:
    for doc, score in doc_scores.items():
        if not math.isfinite(score):
            return f"document {doc!r} scores {score}"
    return None


# Per-query normalisations, named as in ranx.normalization. ranx's "rank" and "borda" are left out: they depend
# on ranx's arbitrary tie order.
NORMALISATIONS: dict[str, Callable[[list[float]], Callable[[float], float]]] = {
    "min-max": _min_max, "max": _max, "sum": _sum, "zmuv": _zmuv, "none": lambda scores: float,
}
# Why a normalisation is undefined for a query's (finite) scores, or None where it is defined. Absent: always defined.
UNDEFINED_FOR: dict[str, Callable[[list[float]], str | None]] = {"max": _max_undefined}


def _normalised(doc_scores: Mapping[str, float], norm: str, position: int, qid: str) -> dict[str, float]:
    scores = list(doc_scores.values())
    reason = _non_finite(doc_scores) or UNDEFINED_FOR.get(norm, lambda _: None)(scores)
    if reason:
        raise UndefinedFusion(f"norm {norm!r}", position, qid, reason)
    normalise = NORMALISATIONS[norm](scores)
    return {doc: normalise(score) for doc, score in doc_scores.items()}


def _check_runs(runs: Sequence[Run]) -> None:
    if len(runs) < 2:
        raise ValueError(f"fusion needs at least two runs, got {len(runs)}")


def _trec_ordered(fused: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {qid: {doc: fused[qid][doc] for doc in ranked(fused[qid])} for qid in sorted(fused)}


def rrf(runs: Sequence[Run], k: int = 60) -> dict[str, dict[str, float]]:
    """Reciprocal Rank Fusion (Cormack et al., 2009): a document scores the sum over runs of ``1 / (k + rank)``.

    Ranks are 1-based (the top document scores ``1 / (k + 1)``, as in ranx) and follow trec_eval order, so tied
    scores get distinct ranks by doc id descending. A document a run did not retrieve gets nothing from it, so any
    score range works, negative included; a NaN score has no rank and raises ``UndefinedFusion``.
    """
    _check_runs(runs)
    if k < 0:
        raise ValueError(f"rrf needs k >= 0, got {k}")
    fused: dict[str, dict[str, float]] = {}
    for position, run in enumerate(runs, start=1):
        for qid, doc_scores in run.items():
            nan = next((doc for doc, score in doc_scores.items() if math.isnan(score)), None)
            if nan is not None:
                raise UndefinedFusion("rrf", position, qid, f"document {nan!r} scores nan, which has no rank")
            query_scores = fused.setdefault(qid, {})
            for rank, doc in enumerate(ranked(doc_scores), start=1):
                query_scores[doc] = query_scores.get(doc, 0.0) + 1.0 / (k + rank)
    return _trec_ordered(fused)


def weighted_sum(runs: Sequence[Run], weights: Sequence[float],
                 norm: str | None = "min-max") -> dict[str, dict[str, float]]:
    """``sum_i weights[i] * normalised score in run i``, each run's scores normalised per query first.

    ``norm`` is one of ranx's ``"min-max"`` (default), ``"max"``, ``"sum"``, ``"zmuv"``, or ``"none"``/None. A
    document missing from a run that holds the query gets that run's minimum normalised score for the query; a
    normalisation that is undefined for a run's scores raises ``UndefinedFusion`` (see the module docstring).
    """
    _check_runs(runs)
    if len(weights) != len(runs):
        raise ValueError(f"weighted_sum needs one weight per run: got {len(weights)} weights for {len(runs)} runs")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise ValueError(f"weighted_sum needs finite numbers as weights, got {list(weights)}")
    norm = "none" if norm is None else norm
    if norm not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {norm!r}: choose one of {', '.join(NORMALISATIONS)}")
    # qid -> [(weight, normalised scores)], one entry per run that retrieved something for the query
    weighted: dict[str, list[tuple[float, dict[str, float]]]] = {}
    for position, (run, weight) in enumerate(zip(runs, weights), start=1):
        for qid, doc_scores in run.items():
            parts = weighted.setdefault(qid, [])
            if doc_scores:
                parts.append((weight, _normalised(doc_scores, norm, position, qid)))
    fused: dict[str, dict[str, float]] = {}
    for qid, parts in weighted.items():
        docs = set().union(*(scores for _, scores in parts))
        worst = [min(scores.values()) for _, scores in parts]
        fused[qid] = {doc: sum(weight * scores.get(doc, low) for (weight, scores), low in zip(parts, worst))
                      for doc in docs}
    return _trec_ordered(fused)


FUSION_METHODS: dict[str, Callable[..., dict[str, dict[str, float]]]] = {
    "rrf": rrf, "wsum": weighted_sum, "weighted_sum": weighted_sum,
}


def fuse(runs: Sequence[Run], method: str = "rrf", **params) -> dict[str, dict[str, float]]:
    """Dispatch to a fusion method by name (``"rrf"`` or ``"wsum"``/``"weighted_sum"``), passing ``params`` on."""
    if method not in FUSION_METHODS:
        raise ValueError(f"unknown fusion method {method!r}: choose one of {', '.join(FUSION_METHODS)}")
    function = FUSION_METHODS[method]
    # Checked here so that a typo in params.yaml reads as a clear error rather than a TypeError.
    signature = inspect.signature(function).parameters
    accepted = [name for name in signature if name != "runs"]
    if unknown := sorted(set(params) - set(accepted)):
        raise ValueError(f"fusion method {method!r} takes {', '.join(accepted)}; unknown: {', '.join(unknown)}")
    required = [name for name in accepted if signature[name].default is inspect.Parameter.empty]
    if missing := [name for name in required if name not in params]:
        raise ValueError(f"fusion method {method!r} needs {', '.join(missing)} (weights: one per run)")
    return function(runs, **params)


def fuse_systems(runs: Mapping[str, Run], specs: Sequence[Mapping]) -> dict[str, dict[str, dict[str, float]]]:
    """Named fused systems from named runs: each spec is ``{"name", "runs": [system, ...], "method", ...params}``
    (e.g. ``{"name": "hybrid", "runs": ["bm25", "finetuned"], "method": "rrf", "k": 60}``).

    A spec naming a system that is absent (e.g. ``finetuned`` when the family has nothing to train) is skipped,
    so one params file serves every family; a spec without a name or with fewer than two runs is an error, and
    so is a normalisation undefined for a member's scores, e.g. "fusion 'hybrid': norm 'max' is undefined for run
    2 ('baseline') query 'q3': its scores are <= 0 (use min-max or zmuv)".
    """
    fused = {}
    for position, spec in enumerate(specs):
        spec = dict(spec)
        name, members = spec.pop("name", None), spec.pop("runs", None)
        if not name or not isinstance(members, (list, tuple)) or len(members) < 2:
            raise ValueError(f"fusion spec {position + 1} needs a name and a list of two or more runs, got "
                             f"name={name!r} runs={members!r}")
        if name in runs or name in fused:
            raise ValueError(f"fusion spec {position + 1}: name {name!r} is already a system")
        if any(member not in runs and member not in fused for member in members):
            continue
        sources = [runs[m] if m in runs else fused[m] for m in members]
        try:
            fused[name] = fuse(sources, str(spec.pop("method", "rrf")), **spec)
        except UndefinedFusion as error:  # name the run, which fuse only knows by position
            raise ValueError(f"fusion {name!r}: {error.message(members[error.position - 1])}") from None
        except ValueError as error:
            raise ValueError(f"fusion {name!r}: {error}") from None
    return fused
