"""The statistics of the benchmark suite: medians, means, sample standard deviations and 95% intervals.

Every section quotes medians of interleaved timings (`median`, `median_ratio`); the quality protocol quotes means
over seeds with Student t-intervals (`ci95`, `welch`); the training section a distribution-free interval of the
per-round ratio (`sign_interval`).
"""
from __future__ import annotations

import math
import statistics
from typing import Iterable, Optional

# Two-sided 95% Student t quantiles by degrees of freedom; a df between two keys takes the lower key's (wider).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}
# The degrees of freedom Welch's interval looks up (its df is fractional; it has always rounded down to these).
WELCH_DFS = (1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30)


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def median_ratio(a: Iterable[float], b: Iterable[float]) -> float:
    """Median over rounds of a / b, for timings whose rounds ran side by side (interleaved)."""
    return median(x / y for x, y in zip(a, b))


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def stdev(values: list[float]) -> float:
    """Sample standard deviation (0 for a single value)."""
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0


def t975(df: float, dfs: Optional[Iterable[int]] = None) -> float:
    """The 95% two-sided t quantile at the largest tabulated df (of `dfs`, default all of T975) not above `df`."""
    return T975[max(d for d in (T975 if dfs is None else dfs) if d <= df)]


def ci95(values: list[float]) -> float:
    """Half-width of the 95% t-interval of the mean (0 for one value)."""
    n = len(values)
    if n < 2:
        return 0.0
    return t975(n - 1) * stdev(values) / math.sqrt(n)


def mean_pm(values: list[float], digits: int = 3) -> str:
    """A table cell "mean ± 95% half-width"; one value has no interval (it shows alone: the table says how many
    seeds), none is a dash."""
    if not values:
        return "—"
    text = f"{mean(values):.{digits}f}"
    return text + (f" ± {ci95(values):.{digits}f}" if len(values) > 1 else "")


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a minus mean of b and the half-width of Welch's 95% interval of that difference."""
    d = mean(a) - mean(b)
    if len(a) < 2 or len(b) < 2:
        return d, float("nan")
    va, vb = stdev(a) ** 2 / len(a), stdev(b) ** 2 / len(b)
    if va + vb == 0:
        return d, 0.0
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return d, t975(max(1, int(df)), WELCH_DFS) * math.sqrt(va + vb)


def sign_interval(values: Iterable[float], level: float = 0.95) -> tuple[float, float, float]:
    """Median and distribution-free `level` interval of the median: order statistics of the sorted values whose
    ranks a Binomial(n, 1/2) puts outside `(1 - level) / 2` on each side (the whole range when n is too small)."""
    values = sorted(values)
    n, tail, j = len(values), 0.0, 0
    while j < n // 2 and tail + math.comb(n, j) / 2 ** n <= (1 - level) / 2:
        tail += math.comb(n, j) / 2 ** n
        j += 1
    low, high = (values[j - 1], values[n - j]) if j else (values[0], values[-1])
    return median(values), low, high
