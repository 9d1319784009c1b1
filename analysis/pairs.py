"""Per-pair descriptive statistics: rates, intervals, exact tests, effect sizes.

Pooled trials of one pair are not independent (the same participant and the same image
appear many times), so these p-values are descriptive; ``analysis.clustered`` gives the
inference that respects the clustering.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.intervals import (
    bh_adjust,
    binomial_test_half,
    clopper_pearson_interval,
    cohens_h,
    holm_adjust,
    wilson_interval,
)

PAIR_COLUMNS = [
    "condition_a",
    "condition_b",
    "n",
    "wins_a",
    "rate_a",
    "wilson_low",
    "wilson_high",
    "cp_low",
    "cp_high",
    "p_value",
    "p_holm",
    "p_bh",
    "cohens_h",
]


def main_trials(responses: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``responses`` that are main trials (all rows when there is no trial_kind)."""
    if "trial_kind" not in responses.columns:
        return responses
    return responses[responses["trial_kind"].astype(str) == "main"]


def included_main_trials(responses: pd.DataFrame) -> pd.DataFrame:
    """Main trials of participants not excluded (column ``participant_excluded``, when
    the export has it): the votes a fitted loss and its held-out score use."""
    main = main_trials(responses)
    if "participant_excluded" in main.columns:
        main = main[~main["participant_excluded"].astype(bool)]
    return main


def ordered_pairs(responses: pd.DataFrame) -> pd.DataFrame:
    """Each trial as an unordered pair: columns condition_a < condition_b, win_a (0/1).

    Keeps the row index of ``responses`` so other columns can be joined back.
    """
    left = responses["condition_left"].astype(str).to_numpy()
    right = responses["condition_right"].astype(str).to_numpy()
    chosen = responses["chosen_condition"].astype(str).to_numpy()
    a = np.where(left < right, left, right)
    b = np.where(left < right, right, left)
    return pd.DataFrame(
        {"condition_a": a, "condition_b": b, "win_a": (chosen == a).astype(np.int64)},
        index=responses.index,
    )


def pair_counts(responses: pd.DataFrame) -> pd.DataFrame:
    """Wins per unordered pair: condition_a, condition_b, n, wins_a (all rows used)."""
    pairs = ordered_pairs(responses)
    grouped = pairs.groupby(["condition_a", "condition_b"], sort=True)["win_a"]
    table = grouped.agg(n="size", wins_a="sum").reset_index()
    table["n"] = table["n"].astype(np.int64)
    table["wins_a"] = table["wins_a"].astype(np.int64)
    return table


def rate_table(counts: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Add rates, intervals, exact tests, Holm/BH adjustments and Cohen's h to counts.

    ``counts`` has columns condition_a, condition_b, n, wins_a. Adjustments run over all
    rows of ``counts`` as one family.
    """
    out = counts.loc[:, ["condition_a", "condition_b", "n", "wins_a"]].copy()
    k = out["wins_a"].to_numpy(dtype=float)
    n = out["n"].to_numpy(dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["rate_a"] = k / n
    out["wilson_low"], out["wilson_high"] = wilson_interval(k, n, alpha)
    out["cp_low"], out["cp_high"] = clopper_pearson_interval(k, n, alpha)
    out["p_value"] = binomial_test_half(k, n)
    out["p_holm"] = holm_adjust(out["p_value"].to_numpy())
    out["p_bh"] = bh_adjust(out["p_value"].to_numpy())
    out["cohens_h"] = cohens_h(out["rate_a"].to_numpy())
    return out.reset_index(drop=True)[PAIR_COLUMNS]


def preference_table(responses: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """One row per unordered condition pair over the main trials of ``responses``.

    Columns: condition_a, condition_b (a < b alphabetically), n (votes), wins_a (votes
    for a), rate_a (wins_a / n), wilson_low/high and cp_low/high (Wilson and
    Clopper–Pearson intervals at level 1 - alpha), p_value (two-sided exact binomial
    against 1/2), p_holm and p_bh (Holm and Benjamini–Hochberg over all pairs), cohens_h
    (effect size of rate_a against 1/2). Rows are sorted by (condition_a, condition_b).
    Filtering excluded participants is the caller's choice (see ``analysis.qc``).
    """
    required = {"condition_left", "condition_right", "chosen_condition"}
    missing = sorted(required - set(responses.columns))
    if missing:
        raise ValueError(f"responses lack column(s) {', '.join(missing)} (contract 2)")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    main = main_trials(responses)
    if main.empty:
        return pd.DataFrame({c: pd.Series(dtype=float) for c in PAIR_COLUMNS}).astype(
            {"condition_a": object, "condition_b": object, "n": np.int64, "wins_a": np.int64}
        )
    return rate_table(pair_counts(main), alpha)
