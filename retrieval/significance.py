"""Paired significance tests, multiple-comparison correction and confidence intervals for two systems scored
on the same queries (per-query scores ``{query_id: score}``, paired by query id)."""

from __future__ import annotations

import math
import numbers
from typing import Hashable, Mapping, TypeVar

import numpy as np
from scipy import stats

K = TypeVar("K", bound=Hashable)

# Random matrices are drawn in blocks of about this many entries, so memory stays bounded for large query sets.
_BLOCK_ENTRIES = 1 << 20


def paired_differences(scores_a: Mapping[str, float], scores_b: Mapping[str, float]) -> np.ndarray:
    """Per-query ``a - b`` over the queries both were scored on, in query id order."""
    common = sorted(set(scores_a) & set(scores_b))
    a = np.array([scores_a[q] for q in common], dtype=float)
    b = np.array([scores_b[q] for q in common], dtype=float)
    bad = [q for q, x, y in zip(common, a, b) if not (math.isfinite(x) and math.isfinite(y))]
    if bad:
        raise ValueError(f"non-finite score for query {bad[0]!r}")
    return a - b


def paired_t_test(scores_a: Mapping[str, float], scores_b: Mapping[str, float]) -> float:
    """Two-sided paired Student's t-test p-value over the queries both systems were scored on.

    Identical per-query scores, or fewer than 2 common queries, give p = 1 (scipy would return nan); the same
    non-zero difference on every query gives p = 0.
    """
    differences = paired_differences(scores_a, scores_b)
    if len(differences) < 2 or not differences.any():
        return 1.0
    if (differences == differences[0]).all():
        return 0.0  # a constant non-zero difference: no variance, t = +-inf (scipy warns of precision loss)
    p = float(stats.ttest_1samp(differences, 0.0).pvalue)  # the paired t-test is a one-sample test of a - b
    return 1.0 if math.isnan(p) else p


def paired_randomization_test(scores_a: Mapping[str, float], scores_b: Mapping[str, float], *,
                              samples: int = 10000, seed: int = 0, max_exact_queries: int = 16) -> float:
    """Two-sided paired randomisation (sign-flip permutation) test of the mean per-query difference.

    Under the null hypothesis each query's difference is as likely to have either sign, so the p-value is the
    share of sign assignments whose |mean| is at least the observed |mean|. With n <= ``max_exact_queries``
    common queries all 2^n assignments are enumerated (exact p); otherwise ``samples`` seeded random ones are
    drawn and p = (hits + 1) / (samples + 1), which counts the observed assignment and is never 0.
    Identical scores, or fewer than 2 common queries, give p = 1.
    """
    _check_samples(samples)
    differences = paired_differences(scores_a, scores_b)
    n = len(differences)
    if n < 2 or not differences.any():
        return 1.0
    observed = abs(differences.sum())  # the sum ranks assignments as the mean does: n is fixed
    # A flipped sum that equals the observed one on paper may differ from it in the last bits.
    threshold = observed - 1e-9 * np.abs(differences).sum()
    if n <= max_exact_queries:
        masks = np.arange(2 ** n)[:, None] >> np.arange(n) & 1  # row i: the binary digits of i
        flipped = (1 - 2 * masks) @ differences
        return float(np.count_nonzero(np.abs(flipped) >= threshold) / 2 ** n)
    rng = np.random.default_rng(seed)
    hits = 0
    for rows in _blocks(samples, n):
        signs = 1.0 - 2.0 * rng.integers(0, 2, size=(rows, n))
        hits += int(np.count_nonzero(np.abs(signs @ differences) >= threshold))
    return (hits + 1) / (samples + 1)


def holm_adjust(p_values: Mapping[K, float]) -> dict[K, float]:
    """Holm-Bonferroni step-down adjusted p-values, same keys: the i-th smallest of m p-values is multiplied by
    (m - i + 1), kept at least as large as every smaller one's adjusted value, and capped at 1.

    Rejecting where the adjusted p <= alpha controls the family-wise error rate at alpha over all m tests.
    """
    for key, p in p_values.items():
        if not (isinstance(p, numbers.Real) and 0.0 <= p <= 1.0):  # also rejects nan
            raise ValueError(f"p-value for {key!r} must be a number in [0, 1], got {p!r}")
    order = sorted(p_values, key=lambda key: p_values[key])  # stable: ties keep their given order
    m = len(order)
    adjusted: dict[K, float] = {}
    running = 0.0
    for rank, key in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p_values[key])))
        adjusted[key] = running
    return {key: adjusted[key] for key in p_values}


def bootstrap_ci(scores_a: Mapping[str, float], scores_b: Mapping[str, float], *, level: float = 0.95,
                 samples: int = 10000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean per-query difference ``a - b``.

    Each of ``samples`` seeded resamples draws the common queries with replacement (as many as there are);
    the interval is the ((1 - level) / 2, (1 + level) / 2) quantiles of the resampled means.
    Identical differences d on every query give (d, d).
    """
    _check_samples(samples)
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be between 0 and 1 exclusive, got {level!r}")
    differences = paired_differences(scores_a, scores_b)
    n = len(differences)
    if n == 0:
        raise ValueError("no query scored for both systems: no confidence interval")
    if (differences == differences[0]).all():
        return float(differences[0]), float(differences[0])
    rng = np.random.default_rng(seed)
    means = np.concatenate([differences[rng.integers(0, n, size=(rows, n))].mean(axis=1)
                            for rows in _blocks(samples, n)])
    low, high = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(low), float(high)


def _blocks(samples: int, n: int) -> list[int]:
    """Row counts of the blocks ``samples`` draws of ``n`` entries are made in."""
    rows = max(1, _BLOCK_ENTRIES // n)
    return [min(rows, samples - start) for start in range(0, samples, rows)]


def _check_samples(samples) -> None:
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
