"""Display calibration summaries: how many participants calibrated their display, and
the distribution of what they measured (CSS px per mm, viewing distance, px per degree,
devicePixelRatio). Pure functions over the export's per-participant display columns
(study_app.export: ``display_*``, repeated on each of a participant's rows)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from analysis.io import DISPLAY_COLUMNS

# export column -> (quantity as the report names it, unit)
QUANTITIES = {
    "display_px_per_mm": ("card calibration", "CSS px/mm"),
    "display_viewing_distance_mm": ("viewing distance", "mm"),
    "display_px_per_deg": ("pixels per degree", "CSS px/deg"),
    "display_dpr": ("devicePixelRatio", "device px/CSS px"),
}


def value_summary(values: Iterable[float]) -> dict[str, float | int | None]:
    """``n``, ``median``, quartiles ``q25``/``q75`` (linear interpolation, as
    ``numpy.percentile``) and ``min``/``max`` of the finite values; statistics are None
    when there is none."""
    array = np.asarray([v for v in values if v is not None], dtype=float)
    array = array[np.isfinite(array)]
    if array.size == 0:
        return {"n": 0, "median": None, "q25": None, "q75": None, "min": None, "max": None}
    q25, median, q75 = np.percentile(array, [25, 50, 75])
    return {
        "n": int(array.size),
        "median": float(median),
        "q25": float(q25),
        "q75": float(q75),
        "min": float(array.min()),
        "max": float(array.max()),
    }


def per_participant(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per participant with their display columns (the first of their rows;
    the values are the same on every row). Columns absent from ``frame`` are missing."""
    present = [c for c in DISPLAY_COLUMNS if c in frame.columns]
    return frame.groupby("participant", sort=True)[present].first().reindex(columns=DISPLAY_COLUMNS)


def display_calibration_table(frame: pd.DataFrame) -> pd.DataFrame | None:
    """The report's display calibration table: per quantity, the participants with a
    value, their share of all ``n`` participants, median, quartiles and range; then the
    participants whose stimuli were unscaled (integer devicePixelRatio, 100 % zoom).
    None when no participant reported a display check (nothing to summarise)."""
    people = per_participant(frame)
    if people["display_status"].replace("", np.nan).dropna().empty:
        return None
    n = len(people)
    rows = []
    for column, (quantity, unit) in QUANTITIES.items():
        summary = value_summary(pd.to_numeric(people[column], errors="coerce"))
        rows.append(
            {
                "quantity": quantity,
                "unit_of_value": unit,
                "participants": summary["n"],
                "share": summary["n"] / n,
                **{k: summary[k] for k in ("median", "q25", "q75", "min", "max")},
            }
        )
    unscaled = people["display_unscaled"].astype("boolean")
    rows.append(
        {
            "quantity": "unscaled stimuli (integer devicePixelRatio, 100 % zoom)",
            "unit_of_value": "",
            "participants": int(unscaled.fillna(False).sum()),
            "share": float(unscaled.fillna(False).sum() / n),
        }
    )
    return pd.DataFrame(
        rows,
        columns=[
            "quantity",
            "unit_of_value",
            "participants",
            "share",
            "median",
            "q25",
            "q75",
            "min",
            "max",
        ],
    )
