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
Where ranx is well defined (no ties, same queries) the results agree: ``tests/test_fusion.py`` checks it.

Conventions: a query is fused over the runs that hold it (a run without it contributes nothing, like a run that
retrieved nothing for it); a document missing from a run gets 0 from that run, as in ranx (for min-max that is
the score of the run's worst document). Output queries are sorted and each query's documents are in trec order.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, Mapping, Sequence

from retrieval.metrics import ranked

Run = Mapping[str, Mapping[str, float]]

_EPS = 1e-9  # ranx's floor on normalisation denominators: a query whose scores are all equal normalises to 0.


def _min_max(scores: list[float]) -> Callable[[float], float]:
    low, high = min(scores), max(scores)
    return lambda s: (s - low) / max(high - low, _EPS)


def _max(scores: list[float]) -> Callable[[float], float]:
    high = max(scores)  # meant for scores >= 0 (BM25, cosine): negative logits would all divide by the 1e-9 floor
    return lambda s: s / max(high, _EPS)


def _sum(scores: list[float]) -> Callable[[float], float]:
    low, total = min(scores), sum(scores)
    return lambda s: (s - low) / max(total - low * len(scores), _EPS)


def _zmuv(scores: list[float]) -> Callable[[float], float]:
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))  # population std, as np.std
    return lambda s: (s - mean) / max(std, _EPS)


# Per-query normalisations, named as in ranx.normalization. ranx's "rank" and "borda" are left out: they depend
# on ranx's arbitrary tie order.
NORMALISATIONS: dict[str, Callable[[list[float]], Callable[[float], float]]] = {
    "min-max": _min_max, "max": _max, "sum": _sum, "zmuv": _zmuv, "none": lambda scores: float,
}


def _check_runs(runs: Sequence[Run]) -> None:
    if len(runs) < 2:
        raise ValueError(f"fusion needs at least two runs, got {len(runs)}")


def _trec_ordered(fused: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {qid: {doc: fused[qid][doc] for doc in ranked(fused[qid])} for qid in sorted(fused)}


def rrf(runs: Sequence[Run], k: int = 60) -> dict[str, dict[str, float]]:
    """Reciprocal Rank Fusion (Cormack et al., 2009): a document scores the sum over runs of ``1 / (k + rank)``.

    Ranks are 1-based (the top document scores ``1 / (k + 1)``, as in ranx) and follow trec_eval order, so tied
    scores get distinct ranks by doc id descending.
    """
    _check_runs(runs)
    if k < 0:
        raise ValueError(f"rrf needs k >= 0, got {k}")
    fused: dict[str, dict[str, float]] = {}
    for run in runs:
        for qid, doc_scores in run.items():
            query_scores = fused.setdefault(qid, {})
            for rank, doc in enumerate(ranked(doc_scores), start=1):
                query_scores[doc] = query_scores.get(doc, 0.0) + 1.0 / (k + rank)
    return _trec_ordered(fused)


def weighted_sum(runs: Sequence[Run], weights: Sequence[float],
                 norm: str | None = "min-max") -> dict[str, dict[str, float]]:
    """``sum_i weights[i] * normalised score in run i``, each run's scores normalised per query first.

    ``norm`` is one of ranx's ``"min-max"`` (default), ``"max"``, ``"sum"``, ``"zmuv"``, or ``"none"``/None.
    """
    _check_runs(runs)
    if len(weights) != len(runs):
        raise ValueError(f"weighted_sum needs one weight per run: got {len(weights)} weights for {len(runs)} runs")
    norm = "none" if norm is None else norm
    if norm not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {norm!r}: choose one of {', '.join(NORMALISATIONS)}")
    fused: dict[str, dict[str, float]] = {}
    for run, weight in zip(runs, weights):
        for qid, doc_scores in run.items():
            query_scores = fused.setdefault(qid, {})
            if not doc_scores:
                continue
            normalise = NORMALISATIONS[norm](list(doc_scores.values()))
            for doc, score in doc_scores.items():
                query_scores[doc] = query_scores.get(doc, 0.0) + weight * normalise(score)
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
    so one params file serves every family; a spec without a name or with fewer than two runs is an error.
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
        fused[name] = fuse(sources, str(spec.pop("method", "rrf")), **spec)
    return fused
