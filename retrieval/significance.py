"""Paired significance tests between two systems scored on the same queries."""

from __future__ import annotations

import math
from typing import Mapping

from scipy import stats


def paired_t_test(scores_a: Mapping[str, float], scores_b: Mapping[str, float]) -> float:
    """Two-sided paired Student's t-test p-value over the queries both systems were scored on.

    Identical per-query scores give p = 1 (scipy would return nan for zero variance of differences).
    """
    common = sorted(set(scores_a) & set(scores_b))
    if len(common) < 2:
        return 1.0
    a = [scores_a[q] for q in common]
    b = [scores_b[q] for q in common]
    if all(x == y for x, y in zip(a, b)):
        return 1.0
    p = float(stats.ttest_rel(a, b).pvalue)
    return 1.0 if math.isnan(p) else p
