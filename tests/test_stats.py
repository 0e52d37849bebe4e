"""stablerl.stats against hand-computed values (hypergeometric sums, t tables, Wilson's formula)."""

import math

import pytest

from stablerl.stats import fisher_exact, mean_ci, t_cdf, t_quantile, welch_ci, wilson


def test_fisher_exact_hand_computed():
    # 5/9 collapsed vs 0/9: margins 9, 9 and 5 collapsed of 18; C(18,5) = 8568; P(k=5) = P(k=0) = 126/8568 and every
    # other table is likelier, so p = 252/8568 = 1/34
    assert fisher_exact(5, 4, 0, 9) == pytest.approx(1 / 34, rel=1e-12)
    # [[3,1],[1,3]]: C(8,4) = 70; P(k) = 1, 16, 36, 16, 1 (/70); tables no likelier than 16/70: 34/70
    assert fisher_exact(3, 1, 1, 3) == pytest.approx(34 / 70, rel=1e-12)
    assert fisher_exact(2, 2, 2, 2) == pytest.approx(1.0)  # the likeliest table: everything counts
    assert fisher_exact(0, 9, 0, 9) == 1.0  # no collapse anywhere: nothing to tell apart
    # symmetric in rows and in columns
    assert fisher_exact(0, 9, 5, 4) == pytest.approx(fisher_exact(5, 4, 0, 9), rel=1e-12)
    assert fisher_exact(4, 5, 9, 0) == pytest.approx(fisher_exact(5, 4, 0, 9), rel=1e-12)
    with pytest.raises(ValueError):
        fisher_exact(-1, 2, 3, 4)


def test_t_distribution_table_values():
    # two-sided 95% critical values from a t table
    for df, t in [(1, 12.706205), (2, 4.302653), (8, 2.306004), (30, 2.042272)]:
        assert t_quantile(0.975, df) == pytest.approx(t, abs=2e-6)
    assert t_cdf(0.0, 5) == pytest.approx(0.5, abs=1e-12)
    assert t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-12)  # Cauchy: 1/2 + atan(1)/pi
    assert t_cdf(-2.0, 3) == pytest.approx(1 - t_cdf(2.0, 3), abs=1e-12)


def test_mean_ci_hand_computed():
    ci = mean_ci([1.0, 2.0, 3.0])  # mean 2, sd 1, se 1/sqrt(3), t(0.975, 2) = 4.302653
    half = 4.302653 / math.sqrt(3)
    assert (ci.mean, ci.n) == (2.0, 3)
    assert ci.low == pytest.approx(2 - half, abs=1e-5) and ci.high == pytest.approx(2 + half, abs=1e-5)
    one = mean_ci([0.4])
    assert one.mean == 0.4 and math.isinf(one.low) and math.isinf(one.high)


def test_wilson_hand_computed():
    # k = 0: the interval is [0, z^2 / (n + z^2)]; z = 1.959964, n = 9 -> 3.841459 / 12.841459
    w = wilson(0, 9)
    assert w.low == 0.0 and w.high == pytest.approx(3.841459 / 12.841459, abs=1e-6)
    # k = 5, n = 9: centre (5/9 + z²/18)/(1 + z²/9), half z·sqrt(p(1-p)/9 + z²/324)/(1 + z²/9)
    z2, p = 3.841459, 5 / 9
    centre = (p + z2 / 18) / (1 + z2 / 9)
    half = math.sqrt(z2) * math.sqrt(p * (1 - p) / 9 + z2 / 324) / (1 + z2 / 9)
    w = wilson(5, 9)
    assert w.low == pytest.approx(centre - half, abs=1e-6) and w.high == pytest.approx(centre + half, abs=1e-6)


def test_welch_ci_hand_computed():
    # equal sd 0.02, n 3 each: se² = 2·0.0004/3, df = 4 exactly, t(0.975, 4) = 2.776445; d = 0.2
    ci = welch_ci([0.90, 0.92, 0.94], [0.70, 0.72, 0.74])
    half = 2.776445 * math.sqrt(2 * 0.0004 / 3)
    assert ci.mean == pytest.approx(0.2) and ci.low == pytest.approx(0.2 - half, abs=1e-6)
    assert ci.high == pytest.approx(0.2 + half, abs=1e-6)
    assert welch_ci([0.5, 0.5], [0.4, 0.4]).low == pytest.approx(0.1)  # no spread: the point itself
    assert math.isinf(welch_ci([0.5], [0.4, 0.3]).low)
