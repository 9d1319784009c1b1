"""Binomial intervals, exact tests, effect sizes and multiple-testing adjustments.

Pure, vectorised functions over numpy arrays: ``k`` successes out of ``n`` trials.
Rates are proportions in [0, 1]; p-values are in [0, 1].
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats


def _as_arrays(k, n) -> tuple[np.ndarray, np.ndarray]:
    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    return k, n


def wilson_interval(k, n, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for k of n (two-sided, level 1 - alpha); NaN where n == 0."""
    k, n = _as_arrays(k, n)
    z = stats.norm.isf(alpha / 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        denom = 1 + z**2 / n
        centre = (p + z**2 / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)


def clopper_pearson_interval(k, n, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Exact (Clopper–Pearson) interval from beta quantiles; NaN where n == 0."""
    k, n = _as_arrays(k, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        low = np.where(k > 0, stats.beta.ppf(alpha / 2, k, n - k + 1), 0.0)
        high = np.where(k < n, stats.beta.isf(alpha / 2, k + 1, n - k), 1.0)
    low = np.where(n > 0, low, np.nan)
    high = np.where(n > 0, high, np.nan)
    return low, high


def binomial_test_half(k, n) -> np.ndarray:
    """Two-sided exact binomial p-value of k of n against p = 1/2 (symmetric null).

    Under p = 1/2 the distribution is symmetric, so the "minimum likelihood" two-sided
    p-value (scipy's ``binomtest``) equals 2 * min(P(X <= k), P(X >= k)), capped at 1.
    """
    k, n = _as_arrays(k, n)
    lower = stats.binom.cdf(k, n, 0.5)
    upper = stats.binom.sf(k - 1, n, 0.5)
    p = np.minimum(1.0, 2.0 * np.minimum(lower, upper))
    return np.where(n > 0, p, np.nan)


def cohens_h(rate, null: float = 0.5) -> np.ndarray:
    """Cohen's h = 2 asin(sqrt(p)) - 2 asin(sqrt(p0)); 0.2 small, 0.5 medium, 0.8 large."""
    rate = np.asarray(rate, dtype=float)
    return 2 * np.arcsin(np.sqrt(rate)) - 2 * np.arcsin(np.sqrt(null))


def holm_adjust(p) -> np.ndarray:
    """Holm (step-down Bonferroni) family-wise adjusted p-values; NaNs stay NaN."""
    p = np.asarray(p, dtype=float)
    out = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    q = p[ok]
    m = q.size
    if m == 0:
        return out
    order = np.argsort(q, kind="mergesort")
    scaled = (m - np.arange(m)) * q[order]
    adjusted = np.minimum(1.0, np.maximum.accumulate(scaled))
    result = np.empty(m)
    result[order] = adjusted
    out[ok] = result
    return out


def bh_adjust(p) -> np.ndarray:
    """Benjamini–Hochberg false-discovery-rate adjusted p-values (q-values); NaNs stay NaN."""
    p = np.asarray(p, dtype=float)
    out = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    q = p[ok]
    m = q.size
    if m == 0:
        return out
    order = np.argsort(q, kind="mergesort")
    scaled = q[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    result = np.empty(m)
    result[order] = adjusted
    out[ok] = result
    return out


def group_bootstrap(
    values: np.ndarray,
    weight: np.ndarray,
    group: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict:
    """Weighted mean of per-triplet ``values`` and its percentile bootstrap CI over groups
    (reference images resampled with replacement): {mean, ci_low, ci_high, n_groups}."""
    values, weight = np.asarray(values, float), np.asarray(weight, float)
    codes, _ = pd.factorize(np.asarray(group))
    n_groups = int(codes.max()) + 1 if len(codes) else 0
    sums = np.bincount(codes, weights=values * weight, minlength=n_groups)
    totals = np.bincount(codes, weights=weight, minlength=n_groups)
    mean = float(sums.sum() / totals.sum()) if totals.sum() > 0 else float("nan")
    if n_groups < 2:
        return {"mean": mean, "ci_low": float("nan"), "ci_high": float("nan"), "n_groups": n_groups}
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
    boot = sums[draws].sum(1) / totals[draws].sum(1)
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return {"mean": mean, "ci_low": float(low), "ci_high": float(high), "n_groups": n_groups}
