"""JND (same / different) data: the share of "different" answers per condition, a
psychometric summary over distortion levels, and metric-vs-human agreement as in the
LPIPS paper (average precision of a metric's distance predicting "different").

Pure functions on the tidy export (contract 2, ``task`` = ``jnd``): a JND row shows the
reference and one condition's reconstruction one after the other (``condition_left`` is
the first image, ``condition_right`` the second, ``reference`` for the reference; both
``reference`` in a catch trial) and ``jnd_answer`` is ``same`` or ``different``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from analysis.clustered import pooled_rate_method, pooled_two_way_rates

REFERENCE = "reference"
IDENTICAL = "reference (identical pair)"  # the condition label of catch trials
RATE_COLUMNS = [
    "condition", "n", "n_participants", "n_images", "n_different", "rate_different",
    "se", "df", "ci_low", "ci_high", "interval",
]  # fmt: skip


def jnd_trials(responses: pd.DataFrame) -> pd.DataFrame:
    """The JND rows of an export as one row per answer: participant, image_id, trial_kind,
    condition (the reconstruction's, or ``IDENTICAL`` for a catch trial), reference_first
    (bool), different (0/1). Rows of other tasks are dropped."""
    if "task" in responses:
        responses = responses[responses["task"].astype(str) == "jnd"]
    left = responses["condition_left"].astype(str)
    right = responses["condition_right"].astype(str)
    condition = np.where(left == REFERENCE, right, left)
    identical = (left == REFERENCE) & (right == REFERENCE)
    return pd.DataFrame(
        {
            "participant": responses["participant"].astype(str).to_numpy(),
            "image_id": responses["image_id"].astype(str).to_numpy(),
            "trial_kind": responses["trial_kind"].astype(str).to_numpy(),
            "condition": np.where(identical, IDENTICAL, condition),
            "reference_first": (left == REFERENCE).to_numpy(),
            "different": (responses["jnd_answer"].astype(str) == "different")
            .astype(np.int64)
            .to_numpy(),
        }
    )


def different_rates(trials: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Per condition (catch trials as ``IDENTICAL``, the false-alarm rate): answers n,
    participants, images, "different" answers and their share (0..1) with a ``level``
    interval that counts participants and images as random, the participants' and
    images' variance shares pooled over the conditions — the same participants and images
    answer every one (:func:`analysis.clustered.pooled_two_way_rates`; a condition
    clustered well beyond the others, or seen on fewer than 5 images, keeps its own
    :func:`analysis.clustered.two_way_rate`; column ``interval`` names the rule).
    ``trials``: :func:`jnd_trials` (main, repeat and catch rows)."""
    conditions, groups = [], []
    for condition, group in trials.groupby("condition", sort=True):
        conditions.append((condition, group))
        groups.append(
            (group["different"].to_numpy(dtype=float), group["participant"], group["image_id"])
        )
    results = pooled_two_way_rates(groups, level, over="conditions")
    rows = [
        {
            "condition": condition,
            "n": len(group),
            "n_participants": group["participant"].nunique(),
            "n_images": group["image_id"].nunique(),
            "n_different": int(y.sum()),
            "rate_different": result["rate"],
            "se": result["se"],
            "df": result["df"],
            "ci_low": result["ci_low"],
            "ci_high": result["ci_high"],
            "interval": result["interval"],
        }
        for (condition, group), (y, _, _), result in zip(conditions, groups, results, strict=True)
    ]
    return pd.DataFrame(rows, columns=RATE_COLUMNS)


def parse_levels(text: str) -> dict[str, float]:
    """Distortion levels from ``"cond=level,cond=level"`` (e.g. ``"q90=1,q50=2,q10=3"``);
    a ValueError names a malformed entry."""
    levels: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, value = part.partition("=")
        try:
            levels[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ValueError(
                f"JND level {part!r} is not CONDITION=NUMBER; write e.g. 'q90=1,q50=2,q10=3'"
            )
    return levels


def psychometric_fit(trials: pd.DataFrame, levels: Mapping[str, float]) -> pd.DataFrame:
    """A logistic psychometric function of the distortion level, P(different) =
    1 / (1 + exp(-(level - threshold) / spread)), fitted by maximum likelihood to the
    main and repeat answers of the conditions that have a level (``levels``: condition ->
    number, e.g. a JPEG quality or noise SD). Returns one row: n, n_levels, threshold (the
    level answered "different" half of the time), spread (levels from 50 % to 73 %),
    slope (logit per level unit), intercept, converged. Needs two or more levels; a
    ValueError names the conditions without a level otherwise."""
    import statsmodels.api as sm

    data = trials[trials["condition"].isin(list(levels))]
    n_levels = data["condition"].map(levels).nunique()
    if n_levels < 2:
        known = sorted(set(trials["condition"]) - {IDENTICAL})
        raise ValueError(
            f"a psychometric fit needs answers at two or more levels; levels were given for "
            f"{sorted(levels)}, the JND conditions are {known}"
        )
    x = data["condition"].map(levels).to_numpy(dtype=float)
    y = data["different"].to_numpy(dtype=float)
    fit = sm.GLM(y, sm.add_constant(x), family=sm.families.Binomial()).fit()
    intercept, slope = (float(v) for v in fit.params)
    return pd.DataFrame(
        [
            {
                "n": len(data),
                "n_levels": int(n_levels),
                "threshold": -intercept / slope if slope else np.nan,
                "spread": 1 / slope if slope else np.nan,
                "slope": slope,
                "intercept": intercept,
                "converged": bool(fit.converged),
            }
        ]
    )


def level_rates(rates: pd.DataFrame, levels: Mapping[str, float]) -> pd.DataFrame:
    """The rate table (:func:`different_rates`) of the conditions with a level, with the
    level, in level order: the points the psychometric function is fitted to."""
    table = rates[rates["condition"].isin(list(levels))].copy()
    table.insert(1, "level", table["condition"].map(levels).astype(float))
    return table.sort_values("level", ignore_index=True)


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve as scikit-learn's
    ``average_precision_score`` computes it: sum over the distinct score thresholds,
    highest first, of (recall step) × (precision at that threshold); tied scores enter
    together. ``labels`` 0/1, ``scores`` higher = more likely 1. NaN without a 1."""
    labels = np.asarray(labels, dtype=float)
    scores = np.asarray(scores, dtype=float)
    if labels.sum() == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    labels, scores = labels[order], scores[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # end of each tie run
    true_pos = np.cumsum(labels)[last]
    precision = true_pos / (last + 1)
    recall = true_pos / labels.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def metric_average_precision(trials: pd.DataFrame, distances: pd.DataFrame) -> pd.DataFrame:
    """Per metric: average precision of its distance (reconstruction vs reference) as a
    predictor of a "different" answer, over the main and repeat answers whose
    (image, condition) has a distance (as the LPIPS paper's JND score; catch trials, at
    distance 0 for every metric, are left out). ``distances``: metric, image_id,
    condition, distance (``analysis.metrics.metric_distances``). Columns: metric, n,
    n_different, average_precision, chance (the share of "different": a metric that ranks
    at random scores about that)."""
    answers = trials[trials["condition"] != IDENTICAL]
    rows = []
    for metric, dist in distances.groupby("metric", sort=False):
        lookup = dist.set_index(["image_id", "condition"])["distance"]
        score = lookup.reindex(
            pd.MultiIndex.from_arrays([answers["image_id"], answers["condition"]])
        ).to_numpy(dtype=float)
        ok = np.isfinite(score)
        y = answers["different"].to_numpy(dtype=float)[ok]
        rows.append(
            {
                "metric": metric,
                "n": int(ok.sum()),
                "n_different": int(y.sum()),
                "average_precision": average_precision(y, score[ok]) if ok.any() else np.nan,
                "chance": float(y.mean()) if ok.any() else np.nan,
            }
        )
    columns = ["metric", "n", "n_different", "average_precision", "chance"]
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values("average_precision", ascending=False, ignore_index=True)


JND_RATE_METHOD = (
    'share of "different" answers per condition (catch trials: the reference shown twice, '
    "the false-alarm rate), interval " + pooled_rate_method("conditions") + "; a condition "
    "clustered well beyond the others keeps its own two-way variance (column interval)"
)
