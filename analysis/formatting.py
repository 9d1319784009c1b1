"""Numbers and column names as a paper prints them (pure functions, no I/O).

- p-values in APA style: ``< .001``, ``.023``, ``> .999`` (no leading zero, three
  decimals; the same rule as R's papaja ``printp``);
- everything else with 3 significant digits in fixed-point notation, never scientific:
  ``0.680``, ``-1.07``, ``812``, ``12,346`` (integer digits are never dropped);
- values that are numerically zero next to the rest of their column (``-5.004e-17``
  beside ``1.75``) print as ``0`` (:func:`format_column`);
- integers with a thousands separator, booleans as yes/no, missing values as an en dash;
- raw column names (``wilson_low``, ``p_holm``, ``median_rt_ms``) as headers with units
  (:func:`column_label`), interval bounds merged into one ``[low, high]`` column
  (:func:`display_table`).

The CSV/Parquet tables keep the raw names and full precision; this module is only for the
HTML/PDF report.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

MISSING = "–"  # en dash: a value that does not exist (not estimated, not applicable)
SIG = 3  # significant digits of every non-p number in the report
EXTRA_DECIMALS = 3  # a column shows at most this many decimals beyond its largest value's


def _finite(x) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def format_p(p: float | None) -> str:
    """APA p-value: ``< .001`` below 0.001, ``> .999`` from 0.9995 on, else three
    decimals without the leading zero (``.023``, ``.500``); NaN/None: an en dash.
    A p-value outside [0, 1] is a bug upstream and raises ValueError."""
    if not _finite(p):
        return MISSING
    p = float(p)
    if p < 0 or p > 1:
        raise ValueError(f"a p-value must lie in [0, 1], got {p!r}")
    if p < 0.001:
        return "< .001"
    if p >= 0.9995:
        return "> .999"
    return f"{p:.3f}".removeprefix("0")


def round_sig(x: float, sig: int = SIG) -> float:
    """``x`` rounded to ``sig`` significant digits (0 stays 0, NaN stays NaN)."""
    if not _finite(x) or x == 0:
        return float(x)
    return float(f"{float(x):.{sig - 1}e}")


def _decimals(x: float, sig: int) -> int:
    """Decimals that show ``sig`` significant digits of ``x`` (0 for |x| >= 10^(sig-1))."""
    rounded = round_sig(x, sig)
    if rounded == 0:
        return 0
    return max(0, sig - 1 - math.floor(math.log10(abs(rounded))))


def format_number(x, sig: int = SIG, max_decimals: int | None = None) -> str:
    """``x`` with ``sig`` significant digits in fixed-point notation.

    Integers (int, numpy integer) print exactly with a thousands separator; floats with
    ``sig`` significant digits but at most ``max_decimals`` decimals (None: no cap), so a
    value below the cap's resolution prints as ``0``; ``-0`` prints as ``0``; booleans as
    yes/no; NaN/None as an en dash; anything else as ``str(x)``.
    """
    if x is None or (isinstance(x, float | np.floating) and math.isnan(x)):
        return MISSING
    if isinstance(x, bool | np.bool_):
        return "yes" if x else "no"
    if isinstance(x, int | np.integer):
        return f"{int(x):,}"
    if not isinstance(x, float | np.floating):
        return str(x)
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    decimals = _decimals(x, sig)
    if max_decimals is not None:
        decimals = min(decimals, max(0, max_decimals))
    text = f"{round_sig(x, sig) if decimals == 0 else float(x):,.{decimals}f}"
    if float(text.replace(",", "")) == 0:
        return "0"
    return text.replace("-", "−")  # a typographic minus, as in print


def column_decimals(values: Iterable, sig: int = SIG) -> int | None:
    """The most decimals a column shows: those its largest finite magnitude needs for
    ``sig`` significant digits, plus ``EXTRA_DECIMALS`` (None: no finite value)."""
    finite = [abs(float(v)) for v in values if _finite(v) and not isinstance(v, bool | np.bool_)]
    if not finite or max(finite) == 0:
        return None
    return _decimals(max(finite), sig) + EXTRA_DECIMALS


def format_column(values: Iterable, sig: int = SIG, p_values: bool = False) -> list[str]:
    """Format one column: p-values with :func:`format_p`, anything else with
    :func:`format_number` capped at :func:`column_decimals` (so numerical noise such as
    ``-5.004e-17`` beside ``1.75`` prints as ``0``)."""
    values = list(values)
    if p_values:
        return [format_p(v) for v in values]
    cap = column_decimals(values, sig)
    return [format_number(v, sig, cap) for v in values]


def format_percent(rate: float, decimals: int = 0) -> str:
    """A proportion in [0, 1] as a percentage: ``0.673 -> "67 %"``; NaN: an en dash."""
    return MISSING if not _finite(rate) else f"{100 * float(rate):.{decimals}f} %"


def format_interval(low, high, sig: int = SIG, max_decimals: int | None = None) -> str:
    """``[low, high]`` with :func:`format_number`; an en dash when either is missing."""
    if not (_finite(low) and _finite(high)):
        return MISSING
    return (
        f"[{format_number(float(low), sig, max_decimals)}, "
        f"{format_number(float(high), sig, max_decimals)}]"
    )


# settings chosen by the analyst, printed as typed (0.05, 0.8), not to 3 significant digits
SETTING_COLUMNS = frozenset({"alpha", "power", "true_rate"})


def format_setting(value) -> str:
    """A setting as typed: ``0.05 -> "0.05"``, ``0.8 -> "0.8"``; NaN/None: an en dash."""
    return f"{float(value):g}" if _finite(value) else MISSING


def is_p_column(name: str) -> bool:
    """p-value columns by name: ``p``, ``p_value``, ``p_holm``, ``p_t_holm`` ..."""
    return name == "p" or name.startswith("p_")


# raw column -> header; "{unit}" is filled from the table's unit column
COLUMN_LABELS: dict[str, str] = {
    "condition": "Condition",
    "condition_a": "Condition A",
    "condition_b": "Condition B",
    "participant": "Participant",
    "n": "Votes (n)",
    "n_votes": "Votes (n)",
    "n_trials": "Trials (n)",
    "n_participants": "Participants (n)",
    "n_images": "Images (n)",
    "wins_a": "A chosen (n)",
    "rate_a": "P(A chosen)",
    "mean_rate_a": "Mean P(A chosen) per participant",
    "cohens_h": "Cohen's h",
    "p": "p",
    "p_value": "p",
    "p_holm": "p (Holm)",
    "p_bh": "p (BH)",
    "p_t": "p (t-test)",
    "p_t_holm": "p (t-test, Holm)",
    "p_wilcoxon": "p (Wilcoxon)",
    "t": "t",
    "statistic": "Statistic",
    "df": "df",
    "se": "SE ({unit})",
    "log_odds": "Log-odds (logit)",
    "log_odds_ml": "Log-odds, ML (logit)",
    "se_ml": "SE, ML (logit)",
    "side_log_odds": "Left-side effect (logit)",
    "side_se": "SE of side effect (logit)",
    "sd_participant": "SD participants (logit)",
    "sd_image": "SD images (logit)",
    "converged": "Converged",
    "boundary": "SD at boundary",
    "method": "Method",
    "reason": "Why not tested",
    "cov": "Covariance",
    "boot_se": "Bootstrap SE",
    "n_boot": "Replicates (n)",
    "resampled": "Resampled",
    "n_main": "Main trials (n)",
    "n_catch": "Catch trials (n)",
    "n_repeat": "Repeat trials (n)",
    "catch_accuracy": "Catch accuracy",
    "repeat_consistency": "Repeat consistency",
    "left_rate": "Left choices (proportion)",
    "left_choices": "Left choices (n)",
    "side_rate": "Side rate (proportion)",
    "median_rt_ms": "Median RT (ms)",
    "fast_fraction": "Fast answers (proportion)",
    "status": "Status",
    "study_excluded": "Flagged by study",
    "study_reasons": "Study's reasons",
    "loo_loglik": "LOO log-likelihood (nats/trial)",
    "outlier_score": "Outlier score (IQRs)",
    "n_timed": "Frame-timed trials (n)",
    "exposure_miss_fraction": "Mistimed exposures (proportion)",
    "reasons": "Excluded by",
    "excluded": "Excluded",
    "rule": "Rule",
    "settings": "Settings",
    "source": "Set by",
    "n_excluded": "Excluded (n)",
    "value": "Value",
    "threshold": "Threshold",
    "true_rate": "True rate",
    "alpha": "α",
    "power": "Power",
    "votes_needed": "Votes needed, independent (n)",
    "design_effect": "Design effect",
    "votes_needed_clustered": "Votes needed, clustered (n)",
    "votes_for_halfwidth_0.05": "Votes for CI ±0.05 (n)",
    "model": "Model",
    "n_splits": "Splits (n)",
    "half_correlation": "Split-half r",
    "spearman_brown": "Spearman–Brown reliability",
    "estimate": "Scale ({unit})",
    "difference": "Difference ({unit})",
    "interval": "Interval",
    "wins": "Wins (n)",
    "comparisons": "Comparisons (n)",
    "prior": "Prior",
    "significant": "Significant (Holm)",
    "items": "Items",
    "metric": "Metric",
    "score_2afc": "2AFC score (proportion)",
    "human_ceiling": "Human ceiling (proportion)",
    "ratio": "Score / ceiling",
    "description": "Description",
    "group": "Image",
    "jod": "Scale (JOD)",
    "components": "Components (n)",
}

# (low, high) bound columns shown as one "[low, high]" column, and its header
INTERVALS: dict[tuple[str, str], str] = {
    ("wilson_low", "wilson_high"): "Wilson {level} CI",
    ("cp_low", "cp_high"): "Clopper–Pearson {level} CI",
    ("rate_low", "rate_high"): "P(A chosen) {level} CI",
    ("ci_low", "ci_high"): "{level} CI ({unit})",
}


def column_label(name: str, unit: str | None = None) -> str:
    """A human-readable header for a raw column name, with its unit where it has one;
    unknown names: underscores to spaces, first letter capitalised."""
    label = COLUMN_LABELS.get(name)
    if label is None:
        return (name.replace("_", " ")[:1].upper() + name.replace("_", " ")[1:]) or name
    return label.replace(" ({unit})", f" ({unit})" if unit else "")


def _unit(table: pd.DataFrame) -> str | None:
    if "unit" not in table.columns:
        return None
    units = table["unit"].dropna().astype(str).unique()
    return units[0] if len(units) == 1 else None


def display_table(
    table: pd.DataFrame,
    level: float = 0.95,
    columns: Iterable[str] | None = None,
    labels: Mapping[str, str] | None = None,
    value_labels: Mapping[str, Mapping[str, str]] | None = None,
) -> pd.DataFrame:
    """A table of strings as a paper prints it: ``columns`` (default: all that exist)
    in that order, interval bounds merged into ``[low, high]``, a constant ``unit`` column
    moved into the headers, p-values APA-style, other numbers with 3 significant
    digits, headers from :func:`column_label` (``labels`` overrides per column).
    ``value_labels`` ({column: {raw value: label}}) prints a column's machine-readable
    keys as words (``fleiss_kappa`` -> ``Fleiss' κ``); values it does not list stay as
    they are. ``level`` (0..1) names the intervals (``95 % CI``)."""
    unit = _unit(table)
    wanted = [c for c in (columns or table.columns) if c in table.columns]
    if unit is not None and "unit" in wanted:
        wanted.remove("unit")
    level_text = f"{100 * level:g} %"
    out: dict[str, list[str]] = {}
    merged = {low: (low, high) for (low, high) in INTERVALS if low in wanted and high in wanted}
    for column in wanted:
        if any(column == high for (_, high) in merged.values()):
            continue
        if column in merged:
            low, high = merged[column]
            cap = column_decimals(list(table[low]) + list(table[high]))
            header = INTERVALS[(low, high)].format(level=level_text, unit=unit or "")
            header = header.replace(" ()", "")
            out[header] = [
                format_interval(a, b, max_decimals=cap)
                for a, b in zip(table[low], table[high], strict=True)
            ]
            continue
        header = (labels or {}).get(column) or column_label(column, unit)
        values = table[column].astype(object).where(table[column].notna(), None)
        if column in (value_labels or {}):
            names = value_labels[column]
            values = values.map(lambda v, names=names: names.get(v, v) if v is not None else v)
        if column in SETTING_COLUMNS:
            out[header] = [format_setting(v) for v in values]
        else:
            out[header] = format_column(values, p_values=is_p_column(column))
    return pd.DataFrame(out, index=table.index)
