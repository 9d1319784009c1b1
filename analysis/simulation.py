"""Simulated 2AFC studies with known true preferences (contract-2 frames).

Used for planning (power by simulation), for checking that intervals cover the truth at
their nominal rate, and for benchmarks. Vectorised; seeded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

JOD_SIGMA = 1.4826  # pwcmp: P(i > j) = Phi((q_i - q_j) / 1.4826), 1 JOD = 75 %


def simulate_responses(
    qualities: Mapping[str, float],
    n_participants: int = 20,
    n_images: int = 10,
    trials_per_participant: int = 60,
    *,
    observer_sd: float = 0.0,
    image_sd: float = 0.0,
    left_bias: float = 0.0,
    seed: int = 0,
    study: str = "simulated",
    model: str = "thurstone",
) -> pd.DataFrame:
    """Simulate main trials of a 2AFC study; returns contract-2 columns.

    ``qualities``: condition -> true quality in JOD (``model="thurstone"``: P(i over j) =
    Phi((q_i - q_j + u) / 1.4826)) or in logits (``model="bt"``: logistic(q_i - q_j + u)),
    where u is the sum of a per-participant and a per-image random shift of the pair's
    difference (sd ``observer_sd``, ``image_sd``, same unit, multiplied by a random sign per
    pair so the mean preference is unchanged) and ``left_bias`` (added for the left side).
    Pairs are drawn uniformly; the side is random.
    """
    from scipy import stats

    rng = np.random.default_rng(seed)
    names = list(qualities)
    if len(names) < 2:
        raise ValueError("need at least two conditions")
    q = np.array([qualities[c] for c in names], dtype=float)
    total = n_participants * trials_per_participant
    participant = np.repeat(np.arange(n_participants), trials_per_participant)
    trial_index = np.tile(np.arange(trials_per_participant), n_participants)
    image = rng.integers(0, n_images, total)
    first = rng.integers(0, len(names), total)
    second = (first + rng.integers(1, len(names), total)) % len(names)
    obs_effect = rng.normal(0.0, observer_sd, n_participants) if observer_sd > 0 else None
    img_effect = rng.normal(0.0, image_sd, n_images) if image_sd > 0 else None
    diff = q[first] - q[second]
    if obs_effect is not None or img_effect is not None:
        shift = np.zeros(total)
        if obs_effect is not None:
            shift += obs_effect[participant]
        if img_effect is not None:
            shift += img_effect[image]
        sign = np.where(first < second, 1.0, -1.0)
        diff = diff + sign * shift
    diff = diff + left_bias  # first is shown on the left
    if model == "thurstone":
        p_first = stats.norm.cdf(diff / JOD_SIGMA)
    elif model == "bt":
        p_first = 1.0 / (1.0 + np.exp(-diff))
    else:
        raise ValueError(f"model must be 'thurstone' or 'bt', got {model!r}")
    chose_first = rng.random(total) < p_first
    names_arr = np.array(names, dtype=object)
    left = names_arr[first]
    right = names_arr[second]
    chosen = np.where(chose_first, left, right)
    rt = rng.lognormal(np.log(1500.0), 0.4, total)
    start = np.datetime64("2026-01-01T00:00:00", "ms") + (participant * 3_600_000).astype(
        "timedelta64[ms]"
    )
    presented = start + (trial_index * 4000).astype("timedelta64[ms]")
    answered = presented + rt.astype("int64").astype("timedelta64[ms]")
    width = len(str(max(n_participants - 1, 0)))
    image_width = len(str(max(n_images - 1, 0)))
    participant_ids = np.array([f"p{i:0{width}d}" for i in range(n_participants)], dtype=object)
    image_ids = np.array([f"img{i:0{image_width}d}" for i in range(n_images)], dtype=object)
    return pd.DataFrame(
        {
            "study": study,
            "participant": participant_ids[participant],
            "trial_index": trial_index.astype(np.int64),
            "trial_kind": "main",
            "image_id": image_ids[image],
            "condition_left": left,
            "condition_right": right,
            "choice": np.where(chose_first, "left", "right"),
            "chosen_condition": chosen,
            "expected_condition": None,
            "rt_ms": rt,
            "presented_at": np.datetime_as_string(presented, unit="ms", timezone="UTC"),
            "answered_at": np.datetime_as_string(answered, unit="ms", timezone="UTC"),
            "reference_shown": True,
            "viewport_w": 1280,
            "viewport_h": 800,
            "device_pixel_ratio": 1.0,
            "participant_status": "completed",
            "participant_excluded": False,
            "exclusion_reasons": "",
        }
    )


def add_catch_trials(
    responses: pd.DataFrame,
    per_participant: int,
    accuracy: Mapping[str, float] | float = 1.0,
    *,
    seed: int = 0,
    degraded: str = "catch-degraded",
    reference: str = "reference",
) -> pd.DataFrame:
    """Append ``per_participant`` catch trials per participant (reference vs a degraded
    copy; expected answer: reference) answered correctly with the given probability
    (one number, or participant -> probability)."""
    rng = np.random.default_rng(seed)
    rows = []
    for participant, group in responses.groupby("participant", sort=True):
        acc = accuracy if isinstance(accuracy, float | int) else accuracy.get(participant, 1.0)
        template = group.iloc[0]
        next_index = int(group["trial_index"].max()) + 1
        for t in range(per_participant):
            ref_left = bool(rng.random() < 0.5)
            correct = bool(rng.random() < acc)
            left, right = (reference, degraded) if ref_left else (degraded, reference)
            chosen = reference if correct else degraded
            row = template.to_dict()
            row.update(
                trial_index=next_index + t,
                trial_kind="catch",
                condition_left=left,
                condition_right=right,
                choice="left" if chosen == left else "right",
                chosen_condition=chosen,
                expected_condition=reference,
            )
            rows.append(row)
    return pd.concat([responses, pd.DataFrame(rows)], ignore_index=True)


def true_pair_rates(
    qualities: Mapping[str, float], pairs: Sequence[tuple[str, str]], model: str = "thurstone"
) -> np.ndarray:
    """P(a chosen over b) for each (a, b) under the simulation model without random effects."""
    from scipy import stats

    diff = np.array([qualities[a] - qualities[b] for a, b in pairs], dtype=float)
    if model == "thurstone":
        return stats.norm.cdf(diff / JOD_SIGMA)
    return 1.0 / (1.0 + np.exp(-diff))
