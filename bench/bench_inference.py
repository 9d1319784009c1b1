"""Calibration: coverage of every interval and family-wise error of every corrected test
that the analysis report shows, on simulated studies with known truth.

    python bench/bench_inference.py [--studies 200] [--seed 0] [--jobs 2] [--quick]
        [--scenarios none,participant,image,both] [--truths null,effects] [--n-boot 500]
        [--intervals two-way] [--model thurstone] [--with-mixed] [--outputs NAME ...]

Design (each study): 20 participants x 10 images x 60 trials, 5 conditions a-e, pairs
drawn uniformly, sides random, no side bias (``analysis.simulation.simulate_responses``).
Scenarios: no effects; participant effects (a pair's difference varies across
participants with SD 0.5 JOD); image effects (SD 0.4 JOD across images); both. Truths:
"null" (all qualities equal) and "effects" (qualities 0, 0.3, 0.6, 0.9, 1.2 JOD).

Estimands (what "covered" means):
- scales (scale_jod / scale_bt, mean zero as the report shows them) and their pairwise
  differences (significance_*): the population scale, i.e. the pooled Thurstone / BT fit
  of an infinite study (``analysis.simulation.population_scale``). Random effects pull
  preferences towards 1/2, so this is the simulated quality times 1.4826 /
  sqrt(1.4826^2 + SD_participant^2 + SD_image^2) for JOD, not the quality itself.
- per-pair rates (pooled Wilson, cluster-robust GLM, cluster bootstrap): the population
  (marginal) rate of the pair (``true_pair_rates`` with the random-effect SDs). The GLM
  is a marginal (GEE-type) model, so this is its estimand.
- random-intercept models (the VB mixed model; the Laplace GLMM of ``analysis.glmm``
  when that module exists): their fixed effect is a conditional log-odds (a typical
  participant on a typical image). It equals 0 under the null; with effects it is known
  exactly only for logistic data (``--model bt``: q_a - q_b), so with Thurstone data
  these intervals are scored under the null only.
- metric agreement (``metrics.metric_agreement``, the report's metric-vs-human table):
  simulated metrics (``metric_producer``) whose 2AFC agreement with a new vote on a new
  image is known exactly (``metric_truth``).
- tests (Holm over the 10 pairs): family-wise error = share of studies with any
  rejection of a true null (all 10 under "null"; none under "effects", where the
  per-null rejection rate, the power, is printed instead).

Verdicts: an interval passes when its coverage is within 0.93-0.97 (nominal 0.95); a
corrected test when its FWE <= 0.05 + 2 MC errors, the MC error of a rate of 0.05 over
the studies (0.015 at 200 studies). MC error of a coverage: the SD of the per-study
coverage (share of a study's intervals that cover) over sqrt(studies), which accounts
for intervals of one study being correlated. Outputs marked "descriptive" ignore the
clustering on purpose (the report labels them so); they are measured to show why.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

PARTICIPANTS, IMAGES, TRIALS = 20, 10, 60
CONDITIONS = ("a", "b", "c", "d", "e")
EFFECTS = (0.0, 0.3, 0.6, 0.9, 1.2)  # JOD (logits with --model bt)
SCENARIOS = {  # key: (label, SD of a pair's difference across participants, across images)
    "none": ("no effects", 0.0, 0.0),
    "participant": ("participant effects SD 0.5", 0.5, 0.0),
    "image": ("image effects SD 0.4", 0.0, 0.4),
    "both": ("both (0.5, 0.4)", 0.5, 0.4),
}
TRUTHS = ("null", "effects")
LEVEL = 0.95
ALPHA = 1 - LEVEL
COVERAGE_BAND = (0.93, 0.97)


@dataclass
class Study:
    """One simulated study and its truths."""

    scenario: str
    truth: str
    index: int
    seed: int
    model: str
    n_boot: int
    qualities: dict[str, float]
    observer_sd: float
    image_sd: float
    main: pd.DataFrame = field(repr=False)

    def scale_truth(self, fit_model: str) -> np.ndarray:
        from analysis.simulation import population_scale

        return population_scale(
            self.qualities,
            fit_model,
            self.model,
            observer_sd=self.observer_sd,
            image_sd=self.image_sd,
        )

    def rate_truth(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        from analysis.simulation import true_pair_rates

        return true_pair_rates(
            self.qualities,
            pairs,
            self.model,
            observer_sd=self.observer_sd,
            image_sd=self.image_sd,
        )

    def conditional_log_odds(self, pairs: list[tuple[str, str]]) -> np.ndarray | None:
        """Truth of a random-intercept logistic model's fixed effect, where it is known."""
        if self.truth == "null":
            return np.zeros(len(pairs))
        if self.model == "bt":
            return np.array([self.qualities[a] - self.qualities[b] for a, b in pairs])
        return None

    def true_null(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        return np.array([self.qualities[a] == self.qualities[b] for a, b in pairs])


@dataclass
class Measure:
    """One output's result in one study: interval hits, or test rejections."""

    output: str
    role: str
    covered: np.ndarray | None = None  # intervals: one bool per interval
    rejected: np.ndarray | None = None  # tests: one bool per hypothesis
    true_null: np.ndarray | None = None


INFERENTIAL = "inferential"
DESCRIPTIVE = "descriptive (ignores clustering)"
API_ONLY = "API only (not in the report)"


def _pairs(table: pd.DataFrame) -> list[tuple[str, str]]:
    return list(
        zip(table["condition_a"].astype(str), table["condition_b"].astype(str), strict=True)
    )


def _covers(low, high, truth) -> np.ndarray:
    low = np.asarray(low, dtype=float)
    high = np.asarray(high, dtype=float)
    truth = np.asarray(truth, dtype=float)
    tol = 1e-9 * np.maximum(1.0, np.abs(truth))
    return (low - tol <= truth) & (truth <= high + tol)  # NaN bounds never cover


def _rejects(p_adjusted) -> np.ndarray:
    p = np.asarray(p_adjusted, dtype=float)
    return np.where(np.isfinite(p), p < ALPHA, False)


# ---------------------------------------------------------------------------------------
# The registry: one producer per report table (or analysis function). Each runs the
# report's own function on the study and returns Measures. Add an output by adding one.
# ---------------------------------------------------------------------------------------


def scale_producer(model: str, interval: str) -> Callable[[Study], list[Measure]]:
    table = "jod" if model == "thurstone" else "bt"
    tag = "" if interval == "two-way" else f" [{interval}]"
    role = INFERENTIAL if interval != "participants" else "old method (not in the report)"

    def produce(study: Study) -> list[Measure]:
        from analysis.scaling import scale_conditions

        result = scale_conditions(
            study.main,
            model,
            n_boot=study.n_boot,
            level=LEVEL,
            seed=study.seed,
            interval=interval,
        )
        names = result.scale["condition"].astype(str).tolist()
        truth = study.scale_truth(model)
        order = [list(study.qualities).index(n) for n in names]
        truth = truth[order]
        sig = result.significance
        pairs = _pairs(sig)
        index = {n: i for i, n in enumerate(names)}
        truth_diff = np.array([truth[index[a]] - truth[index[b]] for a, b in pairs])
        return [
            Measure(
                f"scale_{table}: condition intervals{tag}",
                role,
                covered=_covers(result.scale["ci_low"], result.scale["ci_high"], truth),
            ),
            Measure(
                f"significance_{table}: difference intervals{tag}",
                role,
                covered=_covers(sig["ci_low"], sig["ci_high"], truth_diff),
            ),
            Measure(
                f"significance_{table}: Holm{tag}",
                role,
                rejected=sig["significant"].to_numpy(dtype=bool),
                true_null=study.true_null(pairs),
            ),
        ]

    return produce


def _rate_measures(study, table, interval, test, low, high, role) -> list[Measure]:
    """Coverage of a per-pair rate interval (columns ``low``/``high``) and the Holm FWE
    of its test (column p_holm)."""
    pairs = _pairs(table)
    return [
        Measure(interval, role, covered=_covers(table[low], table[high], study.rate_truth(pairs))),
        Measure(test, role, rejected=_rejects(table["p_holm"]), true_null=study.true_null(pairs)),
    ]


def pooled_producer(study: Study) -> list[Measure]:
    from analysis.pairs import preference_table

    return _rate_measures(
        study,
        preference_table(study.main, ALPHA),
        "pairs: pooled Wilson rate interval",
        "pairs: pooled exact binomial, Holm",
        "wilson_low",
        "wilson_high",
        DESCRIPTIVE,
    )


def two_way_rate_producer(study: Study) -> list[Measure]:
    from analysis.clustered import two_way_rate_tests

    return _rate_measures(
        study,
        two_way_rate_tests(study.main, ALPHA),
        "pairs: rate interval (two-way, shares pooled over pairs, t)",
        "pairs: two-way rate test, Holm",
        "ci_low",
        "ci_high",
        INFERENTIAL,
    )


def cluster_glm_producer(study: Study) -> list[Measure]:
    from analysis.clustered import cluster_robust_glm

    return _rate_measures(
        study,
        cluster_robust_glm(study.main, True, ALPHA),
        "cluster_glm: rate interval (two-way robust, t)",
        "cluster_glm: Holm",
        "ci_low",
        "ci_high",
        API_ONLY,
    )


def cluster_bootstrap_producer(study: Study) -> list[Measure]:
    from analysis.clustered import cluster_bootstrap_rates

    table = cluster_bootstrap_rates(study.main, study.n_boot, LEVEL, study.seed)
    pairs = _pairs(table)
    return [
        Measure(
            "cluster_bootstrap: rate interval (pigeonhole percentile)",
            API_ONLY,
            covered=_covers(table["ci_low"], table["ci_high"], study.rate_truth(pairs)),
        )
    ]


def per_participant_producer(study: Study) -> list[Measure]:
    from analysis.clustered import per_participant_tests

    table = per_participant_tests(study.main)
    pairs = _pairs(table)
    return [
        Measure(
            "per_participant_tests: t, Holm",
            API_ONLY,
            rejected=_rejects(table["p_t_holm"]),
            true_null=study.true_null(pairs),
        )
    ]


def mixed_producer(study: Study) -> list[Measure]:
    from scipy import special

    from analysis.clustered import mixed_logistic

    table = mixed_logistic(study.main, True, seed=study.seed)
    pairs = _pairs(table)
    truth = study.conditional_log_odds(pairs)
    if truth is None:
        return []
    return [
        Measure(
            "mixed_model (VB): rate interval",
            API_ONLY,
            covered=_covers(table["ci_low"], table["ci_high"], special.expit(truth)),
        )
    ]


def glmm_producer(study: Study) -> list[Measure]:
    """The report's primary per-pair test (``glmm_pair_tests``: SDs pooled over the pairs)
    and, side by side, each pair's own REML fit (``test="reml"``, the previous rule)."""
    from analysis.glmm import glmm_pair_tests  # another branch; registered only if present

    out = []
    for test, label, role in (
        ("pooled", "", INFERENTIAL),
        ("reml", " [own SDs per pair]", "previous rule (not in the report)"),
    ):
        table = glmm_pair_tests(study.main, ALPHA, True, test=test, with_ml=False)
        pairs = _pairs(table)
        out.append(
            Measure(
                f"glmm (Laplace): Holm{label}",
                role,
                rejected=_rejects(table["p_holm"]),
                true_null=study.true_null(pairs),
            )
        )
        truth = study.conditional_log_odds(pairs)
        if truth is not None:
            out.append(
                Measure(
                    f"glmm (Laplace): log-odds interval{label}",
                    role,
                    covered=_covers(table["ci_low"], table["ci_high"], truth),
                )
            )
    return out


METRIC_SDS = (0.25, 0.5, 1.0)  # JOD: simulated metrics' errors per (image, condition)


def metric_truth(qualities: dict[str, float], model: str, tau2: float, metric_sd: float) -> float:
    """Population 2AFC agreement of a simulated metric (``metric_producer``) with human
    votes: a new vote, by a new participant on a new image, on a pair drawn uniformly.

    The metric prefers a over b when q_a - q_b > e_b - e_a, e ~ N(0, metric_sd^2) per
    (image, condition), independent of the participants' and images' effects on the
    humans, whose choice of a has the population rate of ``true_pair_rates`` (random part
    with variance ``tau2``). So agreement = P_m P_h + (1 - P_m)(1 - P_h) per pair, with
    P_m = Phi((q_a - q_b) / (sqrt(2) metric_sd)), averaged over the pairs."""
    from itertools import combinations

    from scipy import stats

    from analysis.simulation import true_pair_rates

    pairs = list(combinations(qualities, 2))
    human = true_pair_rates(qualities, pairs, model, observer_sd=float(np.sqrt(tau2)))
    diff = np.array([qualities[a] - qualities[b] for a, b in pairs])
    metric = stats.norm.cdf(diff / (np.sqrt(2.0) * metric_sd))
    return float(np.mean(metric * human + (1 - metric) * (1 - human)))


def simulated_metrics(study: Study) -> tuple[pd.DataFrame, dict[str, float]]:
    """Simulated metrics for ``study``: distance(image, condition) = -quality + e,
    e ~ N(0, sd^2) drawn per study for each sd in ``METRIC_SDS``, so a metric is right
    more often on larger differences and its errors vary from image to image. Returns
    (distances: metric, image_id, condition, distance; metric -> ``metric_truth``)."""
    rng = np.random.default_rng([study.seed, 17])
    images = sorted(study.main["image_id"].astype(str).unique())
    names = list(study.qualities)
    quality = np.array([study.qualities[c] for c in names])
    frames, truth = [], {}
    for sd in METRIC_SDS:
        error = rng.normal(0.0, sd, (len(images), len(names)))
        frames.append(
            pd.DataFrame(
                {
                    "metric": f"sd{sd}",
                    "image_id": np.repeat(images, len(names)),
                    "condition": np.tile(names, len(images)),
                    "distance": (-quality[None, :] + error).ravel(),
                }
            )
        )
        tau2 = study.observer_sd**2 + study.image_sd**2
        truth[f"sd{sd}"] = metric_truth(study.qualities, study.model, tau2, sd)
    return pd.concat(frames, ignore_index=True), truth


def metric_producer(study: Study) -> list[Measure]:
    """``metrics.metric_agreement`` (the report's metric-vs-human table) with the
    ``simulated_metrics``. Truth: ``metric_truth`` (participants and images as samples).
    Also the old percentile bootstrap over images, for comparison."""
    from analysis.metrics import metric_agreement

    distances, truth = simulated_metrics(study)
    out = []
    for interval, label, role in (
        ("two-way", "", INFERENTIAL),
        ("images", " [images bootstrap]", "old method (not in the report)"),
    ):
        table = metric_agreement(
            study.main, distances, n_boot=study.n_boot, seed=study.seed, interval=interval
        )
        expected = table["metric"].map(truth).to_numpy(dtype=float)
        out.append(
            Measure(
                f"metric_agreement: 2AFC score interval{label}",
                role,
                covered=_covers(table["ci_low"], table["ci_high"], expected),
            )
        )
    return out


def holdout_producer(study: Study) -> list[Measure]:
    """The interval of ``metrics.fit_holdout`` (table metric_holdout): the fit itself is
    slow and does not change what the interval must cover, so the ``simulated_metrics``
    stand in for the fitted loss and are scored by ``metrics.holdout_scores`` (the
    function fit_holdout calls) on the images held out by its split rule
    (``metrics.held_out_groups``, share ½, seeded with the study's seed): 5 of the 10
    images. Truth: ``metric_truth``. Also the interval it replaced, a percentile
    bootstrap over the held-out images of vote-weighted (image, pair) cell scores."""
    from analysis.intervals import group_bootstrap
    from analysis.metrics import HOLDOUT_SHARE, held_out_groups, holdout_scores
    from analysis.pairs import ordered_pairs

    distances, truth = simulated_metrics(study)
    held = held_out_groups(study.main["image_id"].astype(str), HOLDOUT_SHARE, study.seed)
    table = holdout_scores(study.main, distances, held, ALPHA)
    expected = table["metric"].map(truth).to_numpy(dtype=float)
    out = [
        Measure(
            "holdout_score: 2AFC score interval on held-out images",
            INFERENTIAL,
            covered=_covers(table["ci_low"], table["ci_high"], expected),
        )
    ]
    main = study.main[study.main["image_id"].astype(str).isin(set(held))]
    pairs = ordered_pairs(main)
    cells = (
        pd.DataFrame(
            {
                "image_id": main["image_id"].astype(str).to_numpy(),
                "condition_a": pairs["condition_a"].to_numpy(),
                "condition_b": pairs["condition_b"].to_numpy(),
                "win_a": pairs["win_a"].to_numpy(dtype=float),
            }
        )
        .groupby(["image_id", "condition_a", "condition_b"], sort=True)["win_a"]
        .agg(n="size", rate="mean")
        .reset_index()
    )
    low, high, metrics = [], [], []
    for metric, dist in distances.groupby("metric", sort=False):
        lookup = dist.set_index(["image_id", "condition"])["distance"]
        da, db = (
            lookup.reindex(pd.MultiIndex.from_arrays([cells["image_id"], cells[c]])).to_numpy()
            for c in ("condition_a", "condition_b")
        )
        rate = cells["rate"].to_numpy()
        score = np.where(da < db, rate, np.where(da > db, 1 - rate, 0.5))
        boot = group_bootstrap(
            score, cells["n"].to_numpy(), cells["image_id"], study.n_boot, study.seed, ALPHA
        )
        low.append(boot["ci_low"])
        high.append(boot["ci_high"])
        metrics.append(truth[metric])
    out.append(
        Measure(
            "holdout_score: 2AFC score interval on held-out images [images bootstrap]",
            "old method (not in the report)",
            covered=_covers(low, high, metrics),
        )
    )
    return out


JND_CONDITIONS = ("q1", "q2", "q3", "q4")
JND_DETAIL = "detail: one interval per study (MC error ~0.015 at 200 studies)"
JND_VISIBILITY = {  # truth -> (visibility of q1..q4, of the identical pair), JOD
    "null": ((-1.5,) * 4, -1.5),  # nothing more visible than the reference itself
    "effects": ((-1.5, -0.5, 0.5, 1.5), -2.5),
}


def jnd_producer(study: Study) -> list[Measure]:
    """The JND report's table jnd_rates (``jnd.different_rates``: the share of
    "different" per condition, catch trials as the identical pair) on a JND study
    simulated with the study's scenario (``simulation.simulate_jnd_responses``: the same
    participants x images x trials, four conditions and the identical pair drawn
    uniformly; a participant's criterion varies with SD ``observer_sd``, an image's
    masking with SD ``image_sd``, both shared by the conditions). Truth:
    ``simulation.true_jnd_rates``. Coverage over the five rows of a study, and of the
    identical pair's (false-alarm) row alone; also each condition's own two-way interval,
    the rule before the shares were pooled over the conditions, and a Wilson interval that
    treats the answers as independent (to show the clustering matters). The JND report
    makes no corrected test."""
    from analysis.clustered import two_way_rate
    from analysis.intervals import wilson_interval
    from analysis.jnd import IDENTICAL, different_rates, jnd_trials
    from analysis.simulation import simulate_jnd_responses, true_jnd_rates

    levels, identical = JND_VISIBILITY[study.truth]
    visibility = dict(zip(JND_CONDITIONS, levels, strict=True))
    responses = simulate_jnd_responses(
        visibility,
        PARTICIPANTS,
        IMAGES,
        TRIALS,
        identical=identical,
        observer_sd=study.observer_sd,
        image_sd=study.image_sd,
        seed=int(np.random.SeedSequence([study.seed, 29]).generate_state(1)[0]),
    )
    truth = true_jnd_rates(
        {**visibility, IDENTICAL: identical},
        observer_sd=study.observer_sd,
        image_sd=study.image_sd,
    )
    trials = jnd_trials(responses)
    table = different_rates(trials, LEVEL)
    expected = table["condition"].map(truth).to_numpy(dtype=float)
    catch = (table["condition"] == IDENTICAL).to_numpy()
    own = [  # each condition's own two-way interval, the rule before the pooled shares
        two_way_rate(g["different"].to_numpy(float), g["participant"], g["image_id"], LEVEL)
        for _, g in trials.groupby("condition", sort=True)
    ]
    wilson = wilson_interval(table["n_different"], table["n"], ALPHA)
    out = []
    for low, high, label, role in (
        (table["ci_low"], table["ci_high"], "", INFERENTIAL),
        (
            [r["ci_low"] for r in own],
            [r["ci_high"] for r in own],
            " [own two-way]",
            "old method (not in the report)",
        ),
        (*wilson, " [Wilson]", "comparison: answers as independent (not in the report)"),
    ):
        covered = _covers(low, high, expected)
        out += [
            Measure(f'jnd_rates: "different" interval{label}', role, covered),
            Measure(
                f'jnd_rates: "different" interval, identical pair only{label}',
                JND_DETAIL if role == INFERENTIAL else role,
                covered[catch],
            ),
        ]
    return out


def registry(intervals: list[str], with_mixed: bool = False) -> dict[str, Callable]:
    """Producer name -> function(Study) -> list[Measure]."""
    out: dict[str, Callable] = {}
    for interval in intervals:
        suffix = "" if interval == "two-way" else f"[{interval}]"
        out[f"scale_jod{suffix}"] = scale_producer("thurstone", interval)
        out[f"scale_bt{suffix}"] = scale_producer("bt", interval)
    out["pairs"] = two_way_rate_producer
    out["pooled"] = pooled_producer
    out["cluster_glm"] = cluster_glm_producer
    out["cluster_bootstrap"] = cluster_bootstrap_producer
    out["per_participant_tests"] = per_participant_producer
    out["metric_agreement"] = metric_producer
    out["holdout_score"] = holdout_producer
    out["jnd_rates"] = jnd_producer
    if importlib.util.find_spec("analysis.glmm") is not None:
        out["glmm"] = glmm_producer
    if with_mixed:
        out["mixed_model"] = mixed_producer
    return out


# ---------------------------------------------------------------------------------------
# Running the studies
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    scenario: str
    truth: str
    index: int
    seed: int
    model: str
    n_boot: int
    producers: tuple[str, ...]
    intervals: tuple[str, ...]
    with_mixed: bool


def study_seed(seed: int, scenario: str, truth: str, index: int) -> int:
    keys = [seed, list(SCENARIOS).index(scenario), TRUTHS.index(truth), index]
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


def make_study(task: Task) -> Study:
    from analysis.simulation import simulate_responses

    _, observer_sd, image_sd = SCENARIOS[task.scenario]
    effects = EFFECTS if task.truth == "effects" else (0.0,) * len(CONDITIONS)
    qualities = dict(zip(CONDITIONS, effects, strict=True))
    main = simulate_responses(
        qualities,
        PARTICIPANTS,
        IMAGES,
        TRIALS,
        observer_sd=observer_sd,
        image_sd=image_sd,
        seed=task.seed,
        model=task.model,
    )
    return Study(
        task.scenario,
        task.truth,
        task.index,
        task.seed,
        task.model,
        task.n_boot,
        qualities,
        observer_sd,
        image_sd,
        main,
    )


def run_task(task: Task) -> list[dict]:
    """Simulate one study, run every producer; one record per output."""
    import warnings

    study = make_study(task)
    producers = registry(list(task.intervals), task.with_mixed)
    records = []
    for name in task.producers:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                measures = producers[name](study)
        except Exception as error:  # counted, shown in the table's errors column
            records.append(
                {
                    "producer": name,
                    "output": f"{name} (error)",
                    "role": "",
                    "error": repr(error),
                    "scenario": task.scenario,
                    "truth": task.truth,
                    "study": task.index,
                }
            )
            continue
        for m in measures:
            record = {
                "producer": name,
                "output": m.output,
                "role": m.role,
                "error": None,
                "scenario": task.scenario,
                "truth": task.truth,
                "study": task.index,
                "coverage": np.nan,
                "fwe": np.nan,
                "power_hits": 0,
                "power_n": 0,
            }
            if m.covered is not None:
                record["coverage"] = float(np.mean(m.covered)) if len(m.covered) else np.nan
            if m.rejected is not None:
                nulls = m.true_null.astype(bool)
                if nulls.any():
                    record["fwe"] = float(np.any(m.rejected[nulls]))
                record["power_hits"] = int(np.sum(m.rejected[~nulls]))
                record["power_n"] = int(np.sum(~nulls))
            records.append(record)
    return records


def run_harness(
    studies: int = 200,
    *,
    seed: int = 0,
    scenarios: tuple[str, ...] = tuple(SCENARIOS),
    truths: tuple[str, ...] = TRUTHS,
    n_boot: int = 500,
    intervals: tuple[str, ...] = ("two-way",),
    model: str = "thurstone",
    with_mixed: bool = False,
    outputs: tuple[str, ...] | None = None,
    jobs: int = 1,
    progress: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run the studies; returns (summary table, per-study records)."""
    available = registry(list(intervals), with_mixed)
    producers = tuple(available) if outputs is None else tuple(outputs)
    unknown = sorted(set(producers) - set(available))
    if unknown:
        raise ValueError(f"unknown output(s) {unknown}; available: {', '.join(available)}")
    tasks = [
        Task(
            s,
            t,
            i,
            study_seed(seed, s, t, i),
            model,
            n_boot,
            producers,
            tuple(intervals),
            with_mixed,
        )
        for s in scenarios
        for t in truths
        for i in range(studies)
    ]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), desc="studies", unit="study", file=sys.stderr)
    records: list[dict] = []
    if jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(jobs) as pool:
            for result in pool.imap_unordered(run_task, tasks, chunksize=2):
                records.extend(result)
                if bar is not None:
                    bar.update()
    else:
        for task in tasks:
            records.extend(run_task(task))
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    frame = pd.DataFrame(records)
    return summarise(frame, studies), frame


def summarise(frame: pd.DataFrame, studies: int) -> pd.DataFrame:
    """One row per (output, scenario, truth, measure): value, MC error, nominal, verdict."""
    rows = []
    fwe_mc = float(np.sqrt(ALPHA * (1 - ALPHA) / studies))
    errors = frame[frame["error"].notna()] if "error" in frame else frame.iloc[:0]
    ok = frame[frame["error"].isna()] if "error" in frame else frame
    for (output, scenario, truth), group in ok.groupby(["output", "scenario", "truth"], sort=False):
        role = group["role"].iloc[0]
        producer = group["producer"].iloc[0]
        n_errors = (
            int(
                (
                    (errors["producer"] == producer)
                    & (errors["scenario"] == scenario)
                    & (errors["truth"] == truth)
                ).sum()
            )
            if len(errors)
            else 0
        )
        base = {
            "output": output,
            "role": role,
            "scenario": scenario,
            "truth": truth,
            "studies": len(group),
            "errors": n_errors,
        }
        cov = group["coverage"].dropna()
        if len(cov):
            value = float(cov.mean())
            mc = float(cov.std(ddof=1) / np.sqrt(len(cov))) if len(cov) > 1 else np.nan
            low, high = COVERAGE_BAND
            rows.append(
                {
                    **base,
                    "measure": "coverage",
                    "value": value,
                    "mc_error": mc,
                    "nominal": LEVEL,
                    "result": "PASS" if low <= value <= high else "FAIL",
                }
            )
        fwe = group["fwe"].dropna()
        if len(fwe):
            value = float(fwe.mean())
            mc = float(np.sqrt(value * (1 - value) / len(fwe)))
            bound = ALPHA + 2 * float(np.sqrt(ALPHA * (1 - ALPHA) / len(fwe)))
            rows.append(
                {
                    **base,
                    "measure": "FWE",
                    "value": value,
                    "mc_error": mc,
                    "nominal": ALPHA,
                    "result": "PASS" if value <= bound else "FAIL",
                }
            )
        power_n = int(group["power_n"].sum())
        if power_n and group["fwe"].isna().all():
            value = float(group["power_hits"].sum() / power_n)
            per_study = group["power_hits"] / group["power_n"].where(group["power_n"] > 0)
            mc = float(per_study.std(ddof=1) / np.sqrt(len(per_study)))
            rows.append(
                {
                    **base,
                    "measure": "power",
                    "value": value,
                    "mc_error": mc,
                    "nominal": np.nan,
                    "result": "(info)",
                }
            )
    table = pd.DataFrame(rows)
    if not table.empty:
        scenario_order = {s: i for i, s in enumerate(SCENARIOS)}
        table["_s"] = table["scenario"].map(scenario_order)
        table["_t"] = table["truth"].map({t: i for i, t in enumerate(TRUTHS)})
        table = table.sort_values(["output", "_t", "_s"], kind="stable").drop(columns=["_s", "_t"])
    table.attrs["fwe_mc_at_nominal"] = fwe_mc
    return table.reset_index(drop=True)


def markdown(table: pd.DataFrame) -> str:
    """Long table: one line per output x scenario x truth x measure."""
    lines = [
        "| output | role | scenario | truth | measure | value | MC error | nominal | result |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for row in table.itertuples(index=False):
        nominal = "" if not np.isfinite(row.nominal) else f"{row.nominal:.2f}"
        if row.measure == "FWE":
            nominal = f"≤ {row.nominal:.2f}"
        errors = f" ({row.errors} errors)" if row.errors else ""
        lines.append(
            f"| {row.output} | {row.role} | {SCENARIOS[row.scenario][0]} | {row.truth} | "
            f"{row.measure} | {row.value:.3f} | {row.mc_error:.3f} | {nominal} | "
            f"{row.result}{errors} |"
        )
    return "\n".join(lines)


def markdown_wide(table: pd.DataFrame) -> str:
    """One line per output x truth x measure, scenarios as columns: value ± MC error and
    the verdict (PASS/FAIL; power rows are information)."""
    scenarios = [s for s in SCENARIOS if s in set(table["scenario"])]
    head = " | ".join(SCENARIOS[s][0] for s in scenarios)
    lines = [
        f"| output | truth | measure (nominal) | {head} |",
        "| --- | --- | --- | " + " | ".join("---" for _ in scenarios) + " |",
    ]
    keys = table[["output", "role", "truth", "measure"]].drop_duplicates()
    for key in keys.itertuples(index=False):
        rows = table[
            (table["output"] == key.output)
            & (table["truth"] == key.truth)
            & (table["measure"] == key.measure)
        ].set_index("scenario")
        nominal = {"coverage": "coverage (0.95)", "FWE": "FWE (≤ 0.05)", "power": "power"}
        cells = []
        for s in scenarios:
            if s not in rows.index:
                cells.append("")
                continue
            r = rows.loc[s]
            mark = "" if r["result"] == "(info)" else f" {r['result']}"
            errors = f" ({r['errors']} errors)" if r["errors"] else ""
            cells.append(f"{r['value']:.3f} ± {r['mc_error']:.3f}{mark}{errors}")
        label = key.output if key.role == INFERENTIAL else f"{key.output} — {key.role}"
        lines.append(
            f"| {label} | {key.truth} | {nominal[key.measure]} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text(errors="replace").splitlines():
            if line.startswith("model name") and ":" in line:
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=None, help="per scenario and truth (200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated")
    parser.add_argument("--truths", default=",".join(TRUTHS), help="null,effects")
    parser.add_argument("--n-boot", type=int, default=None, help="bootstrap replicates (500)")
    parser.add_argument(
        "--intervals",
        default="two-way",
        help="scale interval methods to measure (two-way = the report's; also "
        "two-way-sandwich, participants = the old observer bootstrap)",
    )
    parser.add_argument(
        "--model",
        choices=("thurstone", "bt"),
        default="thurstone",
        help="simulation model; qualities in JOD or logits",
    )
    parser.add_argument(
        "--with-mixed",
        action="store_true",
        help="also the VB mixed model (slow: seconds per study)",
    )
    parser.add_argument("--outputs", nargs="*", default=None, help="producers to run")
    parser.add_argument("--quick", action="store_true", help="20 studies, 100 replicates")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--long", action="store_true", help="one line per scenario")
    parser.add_argument("--csv", default=None, help="also write the summary table here")
    args = parser.parse_args(argv)
    studies = args.studies or (20 if args.quick else 200)
    n_boot = args.n_boot or (100 if args.quick else 500)
    scenarios = tuple(s.strip() for s in args.scenarios.split(",") if s.strip())
    truths = tuple(t.strip() for t in args.truths.split(",") if t.strip())
    bad = [s for s in scenarios if s not in SCENARIOS] + [t for t in truths if t not in TRUTHS]
    if bad:
        parser.error(f"unknown scenario/truth {bad}")
    intervals = tuple(i.strip() for i in args.intervals.split(",") if i.strip())
    print(
        f"# inference calibration: {studies} studies per scenario x truth, "
        f"{PARTICIPANTS} participants x {IMAGES} images x {TRIALS} trials, "
        f"{len(CONDITIONS)} conditions, {args.model} data, n_boot {n_boot}, seed {args.seed}"
    )
    print(f"machine: {machine()}; jobs {args.jobs}")
    start = time.perf_counter()
    table, _ = run_harness(
        studies,
        seed=args.seed,
        scenarios=scenarios,
        truths=truths,
        n_boot=n_boot,
        intervals=intervals,
        model=args.model,
        with_mixed=args.with_mixed,
        outputs=tuple(args.outputs) if args.outputs else None,
        jobs=args.jobs,
        progress=not args.no_progress,
    )
    elapsed = time.perf_counter() - start
    print(markdown(table) if args.long else markdown_wide(table))
    if args.csv:
        table.to_csv(args.csv, index=False)
    inferential = table[table["role"] == INFERENTIAL]
    failed = inferential[inferential["result"] == "FAIL"]
    print(
        f"\n{len(table)} results in {elapsed:.0f} s; inferential results failing: "
        f"{len(failed)}"
        + (" (" + ", ".join(sorted(set(failed["output"]))) + ")" if len(failed) else "")
    )
    if importlib.util.find_spec("analysis.glmm") is None:
        print("analysis.glmm not found: the GLMM per-pair test is not measured.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
