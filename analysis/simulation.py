"""Simulated 2AFC studies with known true preferences (contract-2 frames).

Used for planning (power by simulation), for checking that intervals cover the truth at
their nominal rate, and for benchmarks. Vectorised; seeded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

JOD_SIGMA = 1.4826  # pwcmp: P(i > j) = Phi((q_i - q_j) / 1.4826), 1 JOD = 75 %


def _labels(n_participants: int, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """Participant ids p0, p1, … and image ids img0, img1, … zero-padded to one width."""
    width = len(str(max(n_participants - 1, 0)))
    image_width = len(str(max(n_images - 1, 0)))
    participant_ids = np.array([f"p{i:0{width}d}" for i in range(n_participants)], dtype=object)
    image_ids = np.array([f"img{i:0{image_width}d}" for i in range(n_images)], dtype=object)
    return participant_ids, image_ids


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
    Phi((q_i - q_j + u) / 1.4826)) or in logits (``model="bt"``: logistic(q_i - q_j + u)).
    Random effects (crossed design): each participant p has its own shift of each
    condition's quality, a_pc ~ N(0, observer_sd^2 / 2), and each image m its own shift
    b_mc ~ N(0, image_sd^2 / 2), all independent, so for every pair (i, j) the random part
    u = (a_pi - a_pj) + (b_mi - b_mj) of the difference has SD ``observer_sd`` across
    participants and ``image_sd`` across images (same unit as the qualities).
    ``left_bias`` is added for the left side. Pairs are drawn uniformly; the side is random.
    Because u is random, the population (marginal) preference is pulled towards 1/2; see
    ``population_pair_rates`` and ``population_scale`` for the values a pooled analysis
    estimates.
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
    size = len(names)
    diff = q[first] - q[second]
    if observer_sd > 0:  # per (participant, condition): SD of a pair's difference = observer_sd
        shift = rng.normal(0.0, observer_sd / np.sqrt(2.0), (n_participants, size))
        diff = diff + shift[participant, first] - shift[participant, second]
    if image_sd > 0:  # per (image, condition): SD of a pair's difference = image_sd
        shift = rng.normal(0.0, image_sd / np.sqrt(2.0), (n_images, size))
        diff = diff + shift[image, first] - shift[image, second]
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
    participant_ids, image_ids = _labels(n_participants, n_images)
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
    qualities: Mapping[str, float],
    pairs: Sequence[tuple[str, str]],
    model: str = "thurstone",
    *,
    observer_sd: float = 0.0,
    image_sd: float = 0.0,
) -> np.ndarray:
    """P(a chosen over b) for each (a, b) under the simulation model, no side bias.

    With ``observer_sd = image_sd = 0`` (default) the rate of every participant on every
    image. Otherwise the population (marginal) rate E_u[P(a over b | u)] over the random
    part u ~ N(0, observer_sd^2 + image_sd^2) of the difference (see
    ``simulate_responses``): exactly Phi(d / sqrt(1.4826^2 + tau^2)) for Thurstone,
    Gauss–Hermite quadrature (80 nodes) for Bradley–Terry. This is what pooled rates and
    marginal (GEE-type, e.g. cluster-robust GLM) estimates converge to.
    """
    from scipy import special, stats

    diff = np.array([qualities[a] - qualities[b] for a, b in pairs], dtype=float)
    tau2 = float(observer_sd) ** 2 + float(image_sd) ** 2
    if model == "thurstone":
        return stats.norm.cdf(diff / np.sqrt(JOD_SIGMA**2 + tau2))
    if model != "bt":
        raise ValueError(f"model must be 'thurstone' or 'bt', got {model!r}")
    if tau2 == 0:
        return special.expit(diff)
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)  # weight exp(-x^2 / 2)
    weights = weights / weights.sum()
    return special.expit(diff[:, None] + np.sqrt(tau2) * nodes[None, :]) @ weights


def population_scale(
    qualities: Mapping[str, float],
    fit_model: str = "thurstone",
    model: str = "thurstone",
    *,
    observer_sd: float = 0.0,
    image_sd: float = 0.0,
) -> np.ndarray:
    """The scale (mean zero, in the order of ``qualities``) that a pooled ``fit_model``
    scale of an infinitely large study simulated by ``simulate_responses`` converges to:
    the maximum-likelihood fit of ``fit_model`` ("thurstone": JOD, "bt": logits) to the
    population rates ``true_pair_rates`` of every pair, all pairs equally often (the
    simulation draws pairs uniformly).

    Random effects pull preferences towards 1/2, so with them this is not ``qualities``:
    for Thurstone data and a Thurstone fit it is exactly the centred qualities times
    1.4826 / sqrt(1.4826^2 + observer_sd^2 + image_sd^2). It is the estimand the scale
    intervals of ``analysis.scaling`` are checked against (``bench/bench_inference.py``).
    """
    from analysis.scaling import fit_scale

    names = list(qualities)
    size = len(names)
    ordered = [(a, b) for a in names for b in names if a != b]
    rates = true_pair_rates(qualities, ordered, model, observer_sd=observer_sd, image_sd=image_sd)
    wins = np.zeros((size, size))
    index = {name: i for i, name in enumerate(names)}
    for (a, b), rate in zip(ordered, rates, strict=True):
        wins[index[a], index[b]] = 1000.0 * rate
    return fit_scale(wins, fit_model, 0.0, tol=1e-12)


def simulate_jnd_responses(
    visibility: Mapping[str, float],
    n_participants: int = 20,
    n_images: int = 10,
    trials_per_participant: int = 60,
    *,
    identical: float | None = None,
    observer_sd: float = 0.0,
    image_sd: float = 0.0,
    shared: bool = True,
    seed: int = 0,
    study: str = "simulated-jnd",
) -> pd.DataFrame:
    """Simulate a JND ("same or different?") study; returns the export columns the JND
    analysis reads (``analysis.jnd.jnd_trials``): one row per answer.

    ``visibility``: condition -> how visible its difference from the reference is, in JOD
    (P("different") = Phi((v_c + u_p + w_m) / 1.4826): 0 → answered "different" half of
    the time). ``identical``: the same for the reference shown twice (catch trials, the
    false alarms; e.g. -2.5), drawn like a condition; None: no catch trials. Random
    effects, crossed, shared by all conditions: a participant's criterion u_p ~ N(0,
    observer_sd²) (some say "different" more readily) and an image's masking w_m ~ N(0,
    image_sd²) (artefacts show more on some images); with ``shared=False`` each condition
    (and the identical pair) has its own, independent draws instead, same SDs. Each trial
    draws a condition (or the identical pair) and an image uniformly and shows the
    reference first or second at random. ``true_jnd_rates`` gives the population rates
    (the same either way)."""
    from scipy import stats

    rng = np.random.default_rng(seed)
    names = list(visibility)
    levels = [visibility[c] for c in names]
    if identical is not None:
        names.append(None)
        levels.append(identical)
    if not names:
        raise ValueError("need at least one condition")
    total = n_participants * trials_per_participant
    participant = np.repeat(np.arange(n_participants), trials_per_participant)
    trial_index = np.tile(np.arange(trials_per_participant), n_participants)
    image = rng.integers(0, n_images, total)
    drawn = rng.integers(0, len(names), total)
    latent = np.asarray(levels, dtype=float)[drawn]
    columns = 1 if shared else len(names)
    column = np.zeros(total, dtype=np.int64) if shared else drawn
    latent = latent + rng.normal(0.0, observer_sd, (n_participants, columns))[participant, column]
    latent = latent + rng.normal(0.0, image_sd, (n_images, columns))[image, column]
    different = rng.random(total) < stats.norm.cdf(latent / JOD_SIGMA)
    reference_first = rng.random(total) < 0.5
    shown = np.array(["reference" if c is None else c for c in names], dtype=object)[drawn]
    catch = np.array([c is None for c in names])[drawn]
    participant_ids, image_ids = _labels(n_participants, n_images)
    return pd.DataFrame(
        {
            "study": study,
            "participant": participant_ids[participant],
            "trial_index": trial_index.astype(np.int64),
            "trial_kind": np.where(catch, "catch", "main"),
            "task": "jnd",
            "image_id": image_ids[image],
            "condition_left": np.where(reference_first, "reference", shown),
            "condition_right": np.where(reference_first, shown, "reference"),
            "jnd_answer": np.where(different, "different", "same"),
            "participant_status": "completed",
            "participant_excluded": False,
        }
    )


def true_jnd_rates(
    visibility: Mapping[str, float], *, observer_sd: float = 0.0, image_sd: float = 0.0
) -> dict[str, float]:
    """Population share of "different" per condition of ``simulate_jnd_responses`` (same
    keys as ``visibility``; pass the identical pair's visibility under any key): the
    average over participants and images, Phi(v / sqrt(1.4826² + observer_sd² +
    image_sd²)) — random effects pull the shares towards ½."""
    from scipy import stats

    scale = np.sqrt(JOD_SIGMA**2 + float(observer_sd) ** 2 + float(image_sd) ** 2)
    return {c: float(stats.norm.cdf(v / scale)) for c, v in visibility.items()}
