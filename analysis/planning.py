"""Planning: votes needed per pair (exact binomial power), clustering inflation, and
votes needed until a confidence interval is narrow enough."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from analysis.intervals import binomial_test_half, wilson_interval


def exact_power(n: int, p: float, alpha: float = 0.05) -> float:
    """Power of the two-sided exact binomial test of 1/2 with n votes when the true
    preference is p (reject when the exact p-value <= alpha)."""
    k = np.arange(n + 1)
    reject = binomial_test_half(k, np.full_like(k, n)) <= alpha
    return float(stats.binom.pmf(k[reject], n, p).sum())


def votes_needed(p: float, alpha: float = 0.05, power: float = 0.8, max_n: int = 100_000) -> int:
    """Smallest n such that the exact test has at least ``power`` for every n' >= n
    (exact power saw-tooths in n; this is the safe choice)."""
    if not 0 < p < 1 or p == 0.5:
        raise ValueError("p must be in (0, 1) and differ from 0.5")
    effect = abs(p - 0.5)
    z = stats.norm.isf(alpha / 2) + stats.norm.isf(1 - power)
    guess = int((z / (2 * effect)) ** 2)  # normal approximation as a starting point
    top = min(max_n, max(4 * guess + 50, 100))
    ok = np.array([exact_power(n, p, alpha) >= power for n in range(1, top + 1)])
    if not ok[-1]:
        raise ValueError(f"power {power} not reached within {top} votes")
    last_fail = np.flatnonzero(~ok)
    return int(last_fail[-1] + 2) if last_fail.size else 1


def design_effect(votes_per_cluster: float, icc: float) -> float:
    """Kish's design effect 1 + (m - 1) * ICC for m votes per participant on a pair."""
    return 1.0 + (votes_per_cluster - 1.0) * icc


def votes_for_halfwidth(width: float, p: float = 0.5, alpha: float = 0.05) -> int:
    """Smallest n whose Wilson interval at rate p has half-width <= width."""
    n = 1
    while True:
        low, high = wilson_interval(p * n, n, alpha)
        if (high - low) / 2 <= width:
            return n
        n = n + max(1, n // 20)
        if n > 10_000_000:
            raise ValueError("width too small")


def planning_table(
    rates=(0.6, 0.65, 0.7, 0.75),
    alpha: float = 0.05,
    power: float = 0.8,
    votes_per_participant: float = 1.0,
    icc: float = 0.0,
) -> pd.DataFrame:
    """Votes needed per pair for each true rate, plain and inflated for clustering."""
    deff = design_effect(votes_per_participant, icc)
    rows = []
    for p in rates:
        n = votes_needed(p, alpha, power)
        rows.append(
            {
                "true_rate": p,
                "alpha": alpha,
                "power": power,
                "votes_needed": n,
                "design_effect": deff,
                "votes_needed_clustered": int(np.ceil(n * deff)),
            }
        )
    return pd.DataFrame(rows)


def estimate_icc(main: pd.DataFrame) -> tuple[float, float]:
    """(mean votes per participant per pair, ICC of choices within participant and pair)
    from a one-way ANOVA estimator on the 0/1 outcome (clipped at 0)."""
    from analysis.pairs import ordered_pairs

    pairs = ordered_pairs(main)
    group = (
        main["participant"].astype(str)
        + "\x1f"
        + pairs["condition_a"]
        + "\x1f"
        + pairs["condition_b"]
    ).to_numpy()
    y = pairs["win_a"].to_numpy(dtype=float)
    frame = pd.DataFrame({"g": group, "y": y})
    stats_ = frame.groupby("g")["y"].agg(["mean", "size"])
    k = len(stats_)
    n = len(y)
    if k < 2 or n <= k:
        return float(n / max(k, 1)), 0.0
    grand = y.mean()
    msb = float((stats_["size"] * (stats_["mean"] - grand) ** 2).sum() / (k - 1))
    msw = float(((frame["y"] - frame["g"].map(stats_["mean"])) ** 2).sum() / (n - k))
    m0 = (n - (stats_["size"] ** 2).sum() / n) / (k - 1)
    icc = (msb - msw) / (msb + (m0 - 1) * msw) if (msb + (m0 - 1) * msw) > 0 else 0.0
    return float(n / k), float(max(icc, 0.0))
