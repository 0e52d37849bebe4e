"""Small exact statistics for study verdicts: Fisher's exact test on collapse counts, a t confidence interval on
final accuracy, Wilson's interval on a rate. Pure Python (math only): a study compares 3-30 seeds per cell, where
exact small-sample methods are the right ones and scipy would be a 40 MB dependency for three functions."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def fisher_exact(a: int, b: int, c: int, d: int) -> float:
    """Two-sided p of Fisher's exact test on the 2x2 table [[a, b], [c, d]] (rows: two cells; columns: collapsed,
    not): the probability, under equal rates, of a table at most as likely as the observed one (hypergeometric, the
    margins fixed), the definition R's fisher.test and scipy use."""
    if min(a, b, c, d) < 0:
        raise ValueError(f"fisher_exact: counts must be >= 0, got {(a, b, c, d)}")
    r1, c1, n = a + b, a + c, a + b + c + d

    def prob(k: int) -> float:  # P(top-left = k) with the margins fixed
        return math.comb(r1, k) * math.comb(n - r1, c1 - k) / math.comb(n, c1)

    p_obs = prob(a)
    ks = range(max(0, c1 - (n - r1)), min(r1, c1) + 1)
    # relative tolerance as R uses: tables as likely as the observed one up to rounding count as "as extreme"
    return min(1.0, sum(p for p in map(prob, ks) if p <= p_obs * (1 + 1e-7)))


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by Lentz's continued fraction (Numerical Recipes §6.4)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below the mean: use the symmetry
        return 1.0 - _betainc(b, a, 1.0 - x)
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(lbeta + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, f, cc, dd = 1e-300, 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        dd = 1.0 + num * dd
        dd = 1.0 / (dd if abs(dd) > tiny else tiny)
        cc = 1.0 + num / cc
        cc = cc if abs(cc) > tiny else tiny
        f *= cc * dd
        if abs(1.0 - cc * dd) < 1e-15:
            break
    return front * (f - 1.0)


def t_cdf(t: float, df: float) -> float:
    """Student's t distribution function with df degrees of freedom."""
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t value with t_cdf(t, df) = p (bisection on the monotone cdf: 100 halvings reach float precision)."""
    if not 0 < p < 1:
        raise ValueError(f"t_quantile: p must lie in (0, 1), got {p}")
    lo, hi = -1e6, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int


def mean_ci(xs: Sequence[float], level: float = 0.95) -> Interval:
    """Mean and its two-sided t interval (seeds as independent draws); n = 1 gives an unbounded interval."""
    n = len(xs)
    if n == 0:
        raise ValueError("mean_ci: no values")
    m = sum(xs) / n
    if n == 1:
        return Interval(m, -math.inf, math.inf, 1)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return Interval(m, m - half, m + half, n)


def wilson(k: int, n: int, level: float = 0.95) -> Interval:
    """A rate k/n and Wilson's score interval (sound at k = 0 or k = n, where the normal interval collapses)."""
    if not 0 <= k <= n or n == 0:
        raise ValueError(f"wilson: need 0 <= k <= n and n > 0, got k={k}, n={n}")
    z = _normal_quantile(0.5 + level / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), n)


def _normal_quantile(p: float) -> float:
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 * math.erfc(-mid / math.sqrt(2)) < p else (lo, mid)
    return (lo + hi) / 2


def welch_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """mean(a) - mean(b) and Welch's t interval (unequal variances, Welch-Satterthwaite degrees of freedom); with
    fewer than 2 values on a side the interval is unbounded, with no spread on either side it is the point itself."""
    if not a or not b:
        raise ValueError("welch_ci: both samples need values")
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    d = ma - mb
    if len(a) < 2 or len(b) < 2:
        return Interval(d, -math.inf, math.inf, len(a) + len(b))
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1) / len(a)  # squared standard errors
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1) / len(b)
    if va + vb == 0:
        return Interval(d, d, d, len(a) + len(b))
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = t_quantile(0.5 + level / 2, df) * math.sqrt(va + vb)
    return Interval(d, d - half, d + half, len(a) + len(b))
