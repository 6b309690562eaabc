"""Statistics of the experiment: Student-t intervals, paired tests, Holm's correction, power.

No SciPy: the t distribution's CDF is the regularised incomplete beta function (a continued
fraction, Lentz's method), and its quantiles are found by bisection on that CDF. Both agree with
published tables to the printed digits (``tests/test_experiment_stats.py``).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lead = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side; use symmetry otherwise
        return lead * _betacf(a, b, x) / a
    return 1.0 - lead * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(p: float, df: float) -> float:
    """The t quantile: the t with t_cdf(t, df) = p (bisection)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_ppf: p must be in (0, 1), got {p}")
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def t975(df: int) -> float:
    return t_ppf(0.975, df)


def stats(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """n, mean, sample std, 95% t half-width and the two-sided p-value of mean = 0 (None with n < 2)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "half": None, "p": None}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    se = std / math.sqrt(n)
    if se == 0.0:
        p = 1.0 if mean == 0.0 else 0.0
    else:
        p = 2.0 * (1.0 - t_cdf(abs(mean) / se, n - 1))
    return {"n": n, "mean": mean, "std": std, "half": t975(n - 1) * se, "p": p}


def holm(pvalues: Sequence[Optional[float]]) -> List[Optional[float]]:
    """Holm's step-down adjusted p-values (reject where adjusted p <= alpha; the family-wise error
    rate is at most alpha). None entries (no test) are left out of the family and stay None."""
    idx = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i])
    m = len(idx)
    out: List[Optional[float]] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))  # monotone in rank
        out[i] = running
    return out


def seeds_for_power(sd: float, delta: float, alpha: float = 0.05, power: float = 0.8, n_max: int = 1000) -> int:
    """Smallest number of seeds n for a two-sided paired t-test at level ``alpha`` to detect a mean
    paired difference ``delta`` with probability ``power``, when per-seed differences have standard
    deviation ``sd``: the smallest n >= 2 with t(1 - alpha/2, n-1) + t(power, n-1) <= delta sqrt(n) / sd
    (the usual t approximation of the noncentral t; for sd = delta, alpha 0.05, power 0.8 it gives 10,
    as the exact noncentral computation does)."""
    if sd <= 0 or delta <= 0:
        raise ValueError(f"seeds_for_power: sd and delta must be positive, got sd={sd}, delta={delta}")
    for n in range(2, n_max + 1):
        if t_ppf(1 - alpha / 2, n - 1) + t_ppf(power, n - 1) <= delta * math.sqrt(n) / sd:
            return n
    raise ValueError(f"seeds_for_power: more than {n_max} seeds needed (sd={sd}, delta={delta})")
