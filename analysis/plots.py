"""Figures for the report: preference matrix, scale with intervals, participant QC.

Every function returns a ``matplotlib.figure.Figure`` built without pyplot (no global
state, Agg canvas), so it is safe in a web server and in threads.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def preference_matrix(table: pd.DataFrame) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Square arrays from a preference table: names, rate[i, j] = P(i chosen over j),
    low/high interval bounds for that rate (columns ci_low/ci_high when the table has
    them, e.g. the two-way intervals of the report; else the Wilson interval); NaN where
    a pair was never shown."""
    low_col, high_col = (
        ("ci_low", "ci_high") if "ci_low" in table else ("wilson_low", "wilson_high")
    )
    names = sorted(set(table["condition_a"].astype(str)) | set(table["condition_b"].astype(str)))
    index = {name: i for i, name in enumerate(names)}
    size = len(names)
    rate = np.full((size, size), np.nan)
    low = np.full((size, size), np.nan)
    high = np.full((size, size), np.nan)
    for row in table.itertuples(index=False):
        i, j = index[str(row.condition_a)], index[str(row.condition_b)]
        rate[i, j], rate[j, i] = row.rate_a, 1 - row.rate_a
        row_low, row_high = getattr(row, low_col), getattr(row, high_col)
        low[i, j], high[i, j] = row_low, row_high
        low[j, i], high[j, i] = 1 - row_high, 1 - row_low
    return names, rate, low, high


def preference_matrix_figure(
    table: pd.DataFrame, alpha: float = 0.05, mark_label: str = "Holm p"
) -> Figure:
    """Heatmap of P(row preferred over column) with its interval in each cell.

    ``table`` is ``analysis.preference_table(...)`` (Wilson intervals) or
    ``analysis.clustered.two_way_rate_tests(...)`` (two-way intervals). Cells whose Holm-adjusted p-value
    (column p_holm; the caller may put another test's there and name it in
    ``mark_label``) is below ``alpha`` are marked with an asterisk; grey cells were never
    compared.
    """
    names, rate, low, high = preference_matrix(table)
    # the bounds preference_matrix drew: the table's own interval (two-way in the report)
    interval_label = "two-way interval" if "ci_low" in table else "Wilson interval"
    size = max(len(names), 1)
    fig = _new_figure(1.6 + 1.05 * size, 1.2 + 0.9 * size)
    ax = fig.add_subplot()
    if not names:  # nothing compared yet (e.g. a dashboard before the first vote)
        ax.text(0.5, 0.5, "no votes yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    shown = np.ma.masked_invalid(rate)
    cmap = _diverging_cmap()
    image = ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0)
    significant = np.zeros_like(rate, dtype=bool)
    if "p_holm" in table.columns:
        index = {name: i for i, name in enumerate(names)}
        for row in table.itertuples(index=False):
            if np.isfinite(row.p_holm) and row.p_holm < alpha:
                i, j = index[str(row.condition_a)], index[str(row.condition_b)]
                significant[i, j] = significant[j, i] = True
    for i in range(len(names)):
        for j in range(len(names)):
            if np.isfinite(rate[i, j]):
                mark = "*" if significant[i, j] else ""
                text = f"{100 * rate[i, j]:.0f}%{mark}\n[{100 * low[i, j]:.0f}, {100 * high[i, j]:.0f}]"
                colour = "white" if abs(rate[i, j] - 0.5) > 0.3 else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color=colour)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("column condition")
    ax.set_ylabel("row condition")
    ax.set_title(
        f"P(row preferred over column)\n[{interval_label}]; * {mark_label} < {alpha:g}",
        fontsize=10,
    )
    ax.set_facecolor("#dddddd")
    fig.colorbar(image, ax=ax, label="preference rate", shrink=0.8)
    return fig


def _diverging_cmap():
    from matplotlib import colormaps

    return colormaps["RdBu_r"]


def scale_figure(scale: pd.DataFrame, unit: str = "JOD") -> Figure:
    """Conditions on one axis with intervals; ``scale`` has condition, estimate, ci_low,
    ci_high (e.g. ``analysis.scaling`` output). Sorted by estimate."""
    data = scale.sort_values("estimate")
    fig = _new_figure(6.0, 1.0 + 0.4 * max(len(data), 1))
    ax = fig.add_subplot()
    y = np.arange(len(data))
    est = data["estimate"].to_numpy(dtype=float)
    lo = data["ci_low"].to_numpy(dtype=float)
    hi = data["ci_high"].to_numpy(dtype=float)
    # Interval and estimate drawn separately (a percentile interval, if one is passed,
    # need not contain the point estimate).
    ax.hlines(y, lo, hi, color="#1f4e79", lw=1.5)
    ax.plot(lo, y, "|", hi, y, "|", color="#1f4e79", ms=8)
    ax.plot(est, y, "o", color="#1f4e79")
    ax.set_yticks(y, data["condition"].astype(str).tolist())
    ax.axvline(0.0, color="grey", lw=0.8, ls=":")
    how = (
        "participants and images random"
        if "interval" in data and data["interval"].astype(str).str.startswith("two-way").all()
        else "see the interval column"
    )
    ax.set_xlabel(f"quality scale ({unit}), 95% CI ({how})")
    ax.grid(axis="x", alpha=0.3)
    return fig


def participant_qc_figure(participants: pd.DataFrame) -> Figure:
    """Per-participant QC: left-choice rate vs median response time, outlier score bars.

    ``participants`` is ``analysis.qc`` per-participant table (columns participant,
    left_rate, median_rt_ms, outlier_score, excluded).
    """
    fig = _new_figure(10.0, 4.0)
    ax1, ax2 = fig.subplots(1, 2)
    excluded = participants.get("excluded", pd.Series(False, index=participants.index))
    excluded = excluded.fillna(False).astype(bool).to_numpy()
    if "left_rate" in participants and participants["left_rate"].notna().any():
        rt = participants["median_rt_ms"].to_numpy(dtype=float)
        lr = participants["left_rate"].to_numpy(dtype=float)
        ax1.scatter(rt[~excluded], lr[~excluded], s=14, label="kept", color="#1f4e79")
        ax1.scatter(rt[excluded], lr[excluded], s=18, marker="x", label="excluded", color="#c0392b")
        ax1.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax1.set_xlabel("median response time (ms)")
        ax1.set_ylabel("left-choice rate")
        ax1.legend(loc="best", fontsize=8)
    else:
        ax1.text(0.5, 0.5, "sides / response times not recorded", ha="center", va="center")
        ax1.set_axis_off()
    ax1.set_title("side bias and speed per participant")
    score = participants["outlier_score"].to_numpy(dtype=float)
    order = np.argsort(np.nan_to_num(score, nan=-np.inf))
    ax2.barh(np.arange(len(order)), np.nan_to_num(score[order]), color="#7f8c8d")
    ax2.axvline(1.5, color="#c0392b", lw=1, ls="--", label="1.5: worth a look")
    labels = participants["participant"].astype(str).to_numpy()[order]
    if len(labels) <= 40:
        ax2.set_yticks(np.arange(len(order)), labels, fontsize=7)
    else:
        ax2.set_yticks([])
    ax2.set_xlabel("observer outlier score (IQR-normalised)")
    ax2.set_title("observer outlier screen")
    ax2.legend(loc="lower right", fontsize=8)
    return fig


def figure_png(fig: Figure, dpi: int = 120) -> bytes:
    """PNG bytes of a figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
