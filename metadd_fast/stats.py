"""Statistics of the study's tables: a summary of one variant's per-seed values and a paired
comparison of two variants run on the same seeds (scipy.stats for the tests).

Every per-seed list holds one value per distillation seed (floats, any scale). The spread
is the sample standard deviation (ddof 1); the 95% confidence interval of a mean is
Student's t interval, mean +- t_{0.975, n-1} sd / sqrt(n) (none for n = 1).
"""
from __future__ import annotations

import math
import statistics
from typing import Sequence

from scipy import stats as _st

__all__ = ["summary", "paired"]


def _ci(values: Sequence[float]) -> float:
    """Half-width of the 95% t interval of the mean (NaN for fewer than 2 values)."""
    n = len(values)
    if n < 2:
        return math.nan
    return float(_st.t.ppf(0.975, n - 1)) * statistics.stdev(values) / math.sqrt(n)


def summary(values: Sequence[float]) -> dict:
    """{"n", "mean", "sd", "ci95"} of one variant's per-seed values (sd, ci95 NaN for n < 2)."""
    if not values:
        raise ValueError("values: expected at least one value, got none")
    n = len(values)
    return {"n": n, "mean": statistics.fmean(values), "sd": statistics.stdev(values) if n > 1 else math.nan,
            "ci95": _ci(values)}


def paired(a: Sequence[float], b: Sequence[float]) -> dict:
    """Paired comparison of ``a`` against ``b``, seed by seed (a[i] and b[i] share seed i):
    the differences d = a - b, {"n", "mean", "sd", "ci95"} of d, "t_p" (two-sided paired
    t-test, scipy.stats.ttest_rel), "wilcoxon_p" (two-sided Wilcoxon signed-rank, exact for
    small n; NaN when every difference is 0) and "wins" (seeds with d > 0). p-values are NaN
    for n < 2, and t_p is NaN when every difference is the same (sd 0)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"a, b: expected two equally long non-empty per-seed lists, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    out = summary(d)
    out["wins"] = sum(x > 0 for x in d)
    out["t_p"] = out["wilcoxon_p"] = math.nan
    if len(d) > 1 and statistics.stdev(d) > 0:
        out["t_p"] = float(_st.ttest_rel(a, b).pvalue)
    if len(d) > 1 and any(d):
        out["wilcoxon_p"] = float(_st.wilcoxon(d).pvalue)
    return out
