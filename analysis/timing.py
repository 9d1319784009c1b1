"""Exposure accuracy: how long frame-timed images were really shown, against the request.

One row per phase and requested duration: the limited exposure of a side-by-side trial
(or the first image of a sequential one), the interval between a sequential trial's
images and its second image. Pure function on the tidy export (contract 2).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# Browsers coarsen rAF timestamps; a miss of exactly one frame must not count as more
# (the export's exposure_ok uses the same allowance: study_app.export).
TOLERANCE_MS = 0.5
PHASES = (  # phase, requested column, measured column (or onset/offset columns)
    ("exposure", "exposure_requested_ms", ("exposure_onset_ms", "exposure_offset_ms")),
    ("interval", "isi_requested_ms", ("exposure_offset_ms", "second_onset_ms")),
    ("second image", "second_requested_ms", ("second_onset_ms", "second_offset_ms")),
)
COLUMNS = [
    "phase", "requested_ms", "n", "frame_period_ms", "measured_median_ms",
    "measured_min_ms", "measured_max_ms", "within_one_frame",
]  # fmt: skip


def exposure_accuracy(responses: pd.DataFrame) -> pd.DataFrame:
    """Requested against measured durations of frame-timed trials (milliseconds), per
    phase and requested duration: n trials, median frame period, median / min / max
    measured duration and the share (0..1) within one frame of the request
    (``|measured - requested| <= frame period + TOLERANCE_MS``). Empty without timing."""
    rows = []
    sequential = (
        "second_requested_ms" in responses and responses["second_requested_ms"].notna().any()
    )
    for phase, requested_column, (start, end) in PHASES:
        if requested_column not in responses or end not in responses:
            continue
        frame = responses[responses[requested_column].notna() & responses[end].notna()]
        if phase == "exposure" and sequential:
            phase = "first image"  # a mixed export keeps side-by-side rows apart below
        for requested, group in frame.groupby(requested_column, sort=True):
            measured = (group[end] - group[start]).to_numpy(dtype=float)
            period = group["frame_period_ms"].to_numpy(dtype=float)
            within = np.abs(measured - float(requested)) <= period + TOLERANCE_MS
            rows.append(
                {
                    "phase": phase,
                    "requested_ms": float(requested),
                    "n": len(group),
                    "frame_period_ms": float(np.median(period)),
                    "measured_median_ms": float(np.median(measured)),
                    "measured_min_ms": float(measured.min()),
                    "measured_max_ms": float(measured.max()),
                    "within_one_frame": float(within.mean()),
                }
            )
    return pd.DataFrame(rows, columns=COLUMNS)
