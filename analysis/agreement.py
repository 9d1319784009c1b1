"""Position bias and agreement between observers."""

from __future__ import annotations

import pandas as pd

from analysis.clustered import two_way_rate
from analysis.intervals import binomial_test_half, holm_adjust
from analysis.pairs import ordered_pairs

# The agreement table's statistics: the key its ``statistic`` column holds (CSV, Parquet,
# JSON: machine-readable) and the name the report and the summary print.
STATISTIC_LABELS = {"fleiss_kappa": "Fleiss' κ", "kendall_u": "Kendall's u"}


def position_bias(main: pd.DataFrame, alpha: float = 0.05) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(overall, per_participant) left-choice rates.

    Overall: the rate with the two-way interval and t test against 1/2 of
    ``analysis.clustered.two_way_rate`` (participants differ in their side habits, so
    the votes are not independent; columns ci_low, ci_high, p_value, interval).
    Per participant: exact binomial test against 1/2 of that participant's votes, Holm
    over participants."""
    left = (main["choice"] == "left").to_numpy()
    k, n = int(left.sum()), len(left)
    result = two_way_rate(left, main["participant"], main["image_id"], 1 - alpha)
    overall = pd.DataFrame(
        [
            {
                "n": n,
                "left_choices": k,
                "left_rate": result["rate"],
                "ci_low": result["ci_low"],
                "ci_high": result["ci_high"],
                "df": result["df"],
                "p_value": result["p_value"],
                "interval": result["interval"],
            }
        ]
    )
    grouped = pd.Series(left, index=main.index).groupby(main["participant"].to_numpy())
    per = pd.DataFrame({"n": grouped.size(), "left_choices": grouped.sum()}).reset_index(
        names="participant"
    )
    per["left_rate"] = per["left_choices"] / per["n"]
    per["p_value"] = binomial_test_half(per["left_choices"].to_numpy(), per["n"].to_numpy())
    per["p_holm"] = holm_adjust(per["p_value"].to_numpy())
    return overall, per


def fleiss_kappa_pairs(main: pd.DataFrame) -> float:
    """Fleiss' kappa over items = (image, pair) with two categories (a chosen / b chosen),
    generalised to unequal numbers of ratings per item (items with >= 2 ratings count;
    observed agreement averaged with weights n_i (n_i - 1) ... see Fleiss 1971); equals
    ``statsmodels.stats.inter_rater.fleiss_kappa`` when every item has the same count."""
    pairs = ordered_pairs(main)
    key = [
        main["image_id"].astype(str).to_numpy(),
        pairs["condition_a"].to_numpy(),
        pairs["condition_b"].to_numpy(),
    ]
    grouped = pairs["win_a"].groupby(key)
    k = grouped.sum().to_numpy(dtype=float)
    n = grouped.size().to_numpy(dtype=float)
    keep = n >= 2
    k, n = k[keep], n[keep]
    if n.size == 0:
        return float("nan")
    per_item = (k * (k - 1) + (n - k) * (n - k - 1)) / (n * (n - 1))
    observed = per_item.mean()
    p_a = k.sum() / n.sum()
    expected = p_a**2 + (1 - p_a) ** 2
    return float((observed - expected) / (1 - expected)) if expected < 1 else float("nan")


def kendall_u(main: pd.DataFrame) -> float:
    """Kendall & Babington Smith's coefficient of agreement for paired comparisons,
    u = 2 * (agreeing pairs of judgments) / (all pairs of judgments) - 1 per condition
    pair, pooled; equals the classic u = 2 sum C(a_ij, 2) / (C(m, 2) C(t, 2)) - 1 when
    every one of m observers judged every pair once. 1 = full agreement."""
    pairs = ordered_pairs(main)
    grouped = pairs.groupby(["condition_a", "condition_b"])["win_a"]
    k = grouped.sum().to_numpy(dtype=float)
    n = grouped.size().to_numpy(dtype=float)
    agree = (k * (k - 1) + (n - k) * (n - k - 1)) / 2
    total = n * (n - 1) / 2
    if total.sum() == 0:
        return float("nan")
    return float(2 * agree.sum() / total.sum() - 1)


def agreement_table(main: pd.DataFrame) -> pd.DataFrame:
    """Tidy agreement summary: Fleiss' kappa over (image, pair) items, Kendall's u; the
    ``statistic`` column holds the keys of ``STATISTIC_LABELS``."""
    return pd.DataFrame(
        [
            {
                "statistic": "fleiss_kappa",
                "value": fleiss_kappa_pairs(main),
                "items": "image x condition pair",
            },
            {"statistic": "kendall_u", "value": kendall_u(main), "items": "condition pair"},
        ]
    )
