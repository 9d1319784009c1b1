"""JND analysis (analysis.jnd) and the exposure accuracy summary (analysis.timing) against
hand-computed proportions, a brute-force average precision written from its definition,
scikit-learn's average_precision_score where it is installed, and a scipy maximum-
likelihood fit of the psychometric function."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, special, stats

from analysis.jnd import (
    IDENTICAL,
    average_precision,
    different_rates,
    jnd_trials,
    level_rates,
    metric_average_precision,
    parse_levels,
    psychometric_fit,
)
from analysis.timing import exposure_accuracy


def _export(rows) -> pd.DataFrame:
    """Export rows from (participant, image, first, second, answer, kind)."""
    return pd.DataFrame(
        [
            {
                "participant": p, "image_id": i, "condition_left": first,
                "condition_right": second, "jnd_answer": answer, "trial_kind": kind,
                "task": "jnd",
            }
            for p, i, first, second, answer, kind in rows
        ]
    )  # fmt: skip


FIXTURE = _export(
    [
        ("p1", "a", "reference", "q10", "different", "main"),
        ("p1", "b", "q10", "reference", "different", "main"),
        ("p1", "a", "reference", "q90", "same", "main"),
        ("p1", "b", "q90", "reference", "different", "main"),
        ("p1", "a", "reference", "reference", "same", "catch"),
        ("p2", "a", "q10", "reference", "different", "main"),
        ("p2", "b", "reference", "q10", "same", "main"),
        ("p2", "a", "q90", "reference", "same", "main"),
        ("p2", "b", "reference", "q90", "same", "main"),
        ("p2", "b", "reference", "reference", "different", "catch"),
        ("p3", "a", "reference", "q10", "different", "repeat"),
    ]
)


def test_different_rates_are_the_hand_counted_shares_with_two_way_intervals():
    trials = jnd_trials(pd.concat([FIXTURE, FIXTURE.assign(task="2afc")]))  # 2afc dropped
    assert len(trials) == len(FIXTURE)
    assert trials["reference_first"].sum() == 7
    rates = different_rates(trials).set_index("condition")
    # by hand: q10 4 of 5 answers "different", q90 1 of 4, identical pairs 1 of 2
    assert rates.loc["q10", ["n", "n_different"]].tolist() == [5, 4]
    assert rates.loc["q10", "rate_different"] == pytest.approx(4 / 5)
    assert rates.loc["q90", "rate_different"] == pytest.approx(1 / 4)
    assert rates.loc[IDENTICAL, "rate_different"] == pytest.approx(1 / 2)
    assert rates.loc["q10", "n_participants"] == 3 and rates.loc["q90", "n_images"] == 2
    for row in rates.itertuples():
        assert row.ci_low <= row.rate_different <= row.ci_high
    # 2 images (< 5): participants only; the sandwich G/(G-1) sum_g (sum of y - rate)^2 / n^2
    by_participant = {"p1": [1, 1], "p2": [1, 0], "p3": [1]}
    sums = [sum(y) - len(y) * 0.8 for y in by_participant.values()]
    se = np.sqrt(3 / 2 * sum(s**2 for s in sums) / 5**2)
    assert rates.loc["q10", "se"] == pytest.approx(se)
    assert rates.loc["q10", "df"] == 2
    assert "participant cluster-robust" in rates.loc["q10", "interval"]


def _ap_by_definition(labels, scores) -> Fraction:
    """Sum over distinct thresholds t (descending) of (R(t) - R(previous)) * P(t), with
    exact fractions: precision and recall of "score >= t"."""
    positives = sum(labels)
    total, previous_recall = Fraction(0), Fraction(0)
    for threshold in sorted(set(scores), reverse=True):
        chosen = [label for label, score in zip(labels, scores, strict=True) if score >= threshold]
        recall = Fraction(sum(chosen), positives)
        total += (recall - previous_recall) * Fraction(sum(chosen), len(chosen))
        previous_recall = recall
    return total


def test_average_precision_matches_its_definition_and_a_hand_example():
    # by hand, no ties: positives at ranks 1, 3, 4 -> (1/1 + 2/3 + 3/4) / 3
    assert average_precision([1, 0, 1, 1, 0], [0.9, 0.8, 0.7, 0.3, 0.1]) == pytest.approx(
        (1 + 2 / 3 + 3 / 4) / 3
    )
    # ties enter together: {0.5: 1 of 2 positive}, {0.2: the other positive}
    assert average_precision([1, 0, 1], [0.5, 0.5, 0.2]) == pytest.approx(0.5 * 0.5 + 0.5 * (2 / 3))
    rng = np.random.default_rng(19)
    for _ in range(40):
        n = int(rng.integers(2, 30))
        labels = rng.integers(0, 2, n)
        labels[0] = 1
        scores = rng.integers(0, 6, n) / 5  # many ties, as per-item distances give
        assert average_precision(labels, scores) == pytest.approx(
            float(_ap_by_definition(labels.tolist(), scores.tolist()))
        )
    assert np.isnan(average_precision([0, 0], [0.1, 0.2]))


def test_average_precision_matches_scikit_learn():
    from sklearn import metrics  # a test dependency (requirements-dev.txt)

    rng = np.random.default_rng(7)
    for _ in range(20):
        labels = rng.integers(0, 2, 50)
        labels[0] = 1
        scores = rng.integers(0, 10, 50).astype(float)
        assert average_precision(labels, scores) == pytest.approx(
            metrics.average_precision_score(labels, scores)
        )


def test_metric_average_precision_scores_each_metric_over_main_answers():
    trials = jnd_trials(FIXTURE)
    distances = pd.DataFrame(
        [
            (metric, image, condition, value)
            for metric, scale in (("good", 1.0), ("backwards", -1.0))
            for image, condition, value in itertools.product("ab", ("q10", "q90"), [0.0])
            for value in [scale * (3.0 if condition == "q10" else 1.0)]
        ],
        columns=["metric", "image_id", "condition", "distance"],
    )
    table = metric_average_precision(trials, distances).set_index("metric")
    answers = trials[trials["condition"] != IDENTICAL]
    y = answers["different"].tolist()  # catch trials left out: 9 answers, 5 "different"
    assert table.loc["good", ["n", "n_different"]].tolist() == [9, 5]
    for metric, scale in (("good", 1.0), ("backwards", -1.0)):
        scores = [scale * (3.0 if c == "q10" else 1.0) for c in answers["condition"]]
        assert table.loc[metric, "average_precision"] == pytest.approx(
            float(_ap_by_definition(y, scores))
        )
    assert table.loc["good", "chance"] == pytest.approx(5 / 9)
    assert table.index[0] == "good"  # sorted best first


def test_the_psychometric_fit_recovers_a_known_threshold_and_equals_scipys_fit():
    rng = np.random.default_rng(3)
    threshold, spread = 2.5, 0.6
    levels = {f"level{k}": float(k) for k in range(1, 5)}
    rows = []
    for name, level in levels.items():
        p = special.expit((level - threshold) / spread)
        for j in range(400):
            answer = "different" if rng.random() < p else "same"
            rows.append((f"p{j % 20}", f"i{j % 10}", "reference", name, answer, "main"))
    trials = jnd_trials(_export(rows))
    fit = psychometric_fit(trials, levels).iloc[0]
    assert fit["threshold"] == pytest.approx(threshold, abs=0.1)
    assert fit["spread"] == pytest.approx(spread, rel=0.15)
    x = trials["condition"].map(levels).to_numpy()
    y = trials["different"].to_numpy()

    def negative_log_likelihood(theta):
        z = theta[0] + theta[1] * x
        return -np.sum(y * z - np.logaddexp(0, z))

    reference = optimize.minimize(negative_log_likelihood, [0.0, 1.0], method="BFGS").x
    assert [fit["intercept"], fit["slope"]] == pytest.approx(reference, abs=1e-4)
    points = level_rates(different_rates(trials), levels)
    assert points["level"].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert points["rate_different"].is_monotonic_increasing


def test_levels_are_parsed_and_a_fit_without_two_levels_says_what_is_missing():
    assert parse_levels("q90=1, q50=2.5,q10=3") == {"q90": 1.0, "q50": 2.5, "q10": 3.0}
    with pytest.raises(ValueError, match="'q90' is not CONDITION=NUMBER"):
        parse_levels("q90")
    with pytest.raises(ValueError, match="'q9=x' is not CONDITION=NUMBER"):
        parse_levels("q9=x")
    with pytest.raises(ValueError, match=r"the JND conditions are \['q10', 'q90'\]"):
        psychometric_fit(jnd_trials(FIXTURE), {"q10": 1.0})


def test_exposure_accuracy_counts_trials_within_one_frame_of_the_request():
    period = 16.7
    frame = pd.DataFrame(
        {
            "frame_period_ms": [period] * 4 + [np.nan],
            "exposure_requested_ms": [100.0, 100.0, 100.0, 500.0, np.nan],
            "exposure_onset_ms": [0.0, 10.0, 20.0, 0.0, np.nan],
            # measured 100, 116 (within one frame), 140 (not), 500
            "exposure_offset_ms": [100.0, 126.0, 160.0, 500.0, np.nan],
        }
    )
    table = exposure_accuracy(frame)
    assert table["phase"].tolist() == ["exposure", "exposure"]
    hundred = table.iloc[0]
    assert (hundred["requested_ms"], hundred["n"]) == (100.0, 3)
    assert hundred["within_one_frame"] == pytest.approx(2 / 3)
    assert hundred["measured_median_ms"] == pytest.approx(116.0)
    assert (hundred["measured_min_ms"], hundred["measured_max_ms"]) == (100.0, 140.0)
    assert table.iloc[1]["within_one_frame"] == 1.0
    sequential = frame.iloc[:2].assign(
        isi_requested_ms=250.0,
        second_requested_ms=100.0,
        second_onset_ms=[350.0, 426.0],  # intervals 250 and 300
        second_offset_ms=[450.0, 526.0],
    )
    phases = exposure_accuracy(sequential).set_index("phase")
    assert phases.index.tolist() == ["first image", "interval", "second image"]
    assert phases.loc["interval", "within_one_frame"] == pytest.approx(0.5)
    assert phases.loc["second image", "within_one_frame"] == 1.0
    assert exposure_accuracy(frame.iloc[4:]).empty


def _one_way_variance(y, groups) -> tuple[float, int]:
    """statsmodels' cluster-robust variance of the mean of ``y`` without its small-sample
    factor, times G / (G - 1); and G."""
    import statsmodels.api as sm

    codes = pd.factorize(pd.Series(groups).astype(str))[0]
    fit = sm.OLS(y, np.ones((len(y), 1))).fit(
        cov_type="cluster", cov_kwds={"groups": codes, "use_correction": False}
    )
    g = int(codes.max()) + 1
    return float(fit.cov_params()[0, 0]) * g / (g - 1), g


def test_different_rates_pool_the_variance_shares_over_the_conditions():
    """Every condition (and the identical pair) of one JND study is answered by the same
    participants on the same images, so the participants' and images' shares of the
    variance, r = V_factor / V_cells - 1 from statsmodels' one-way sandwiches, are
    averaged over the conditions (vote-weighted) and each condition gets V_cells (1 +
    r_p + r_i), Student t with G - 1 df (G the fewer levels of the factors with a
    positive share)."""
    from analysis.clustered import pooled_rate_method
    from analysis.simulation import simulate_jnd_responses

    visibility = {"q1": -1.0, "q2": 0.0, "q3": 1.0}
    answers = simulate_jnd_responses(
        visibility, 20, 10, 60, identical=-2.0, observer_sd=0.8, image_sd=0.5, seed=4
    )
    trials = jnd_trials(answers)
    rates = different_rates(trials).set_index("condition")
    parts, sizes = {}, {}
    for condition, group in trials.groupby("condition"):
        y = group["different"].to_numpy(dtype=float)
        cells = group["participant"] + "/" + group["image_id"]
        parts[condition] = {
            k: _one_way_variance(y, g)
            for k, g in (("p", group["participant"]), ("i", group["image_id"]), ("c", cells))
        }
        sizes[condition] = len(y)
    weights = np.array([sizes[c] for c in parts], dtype=float)
    shares = {
        k: np.average([v[k][0] / v["c"][0] - 1 for v in parts.values()], weights=weights)
        for k in ("p", "i")
    }
    assert shares["p"] > 0 and shares["i"] > 0  # criterion and masking effects were simulated
    assert set(rates.index) == {"q1", "q2", "q3", IDENTICAL}
    for condition, row in rates.iterrows():
        assert row["interval"] == pooled_rate_method("conditions")
        expected = parts[condition]["c"][0] * (1 + shares["p"] + shares["i"])
        assert row["se"] ** 2 == pytest.approx(expected, rel=1e-10)
        assert row["df"] == 10 - 1  # images: the fewer levels
        half = stats.t.isf(0.025, 9) * row["se"]
        assert row["ci_low"] == pytest.approx(max(row["rate_different"] - half, 0.0))
        assert row["ci_high"] == pytest.approx(min(row["rate_different"] + half, 1.0))


def test_simulated_jnd_shares_converge_to_the_population_rates():
    """``simulate_jnd_responses`` with many participants and images: the share of
    "different" per condition is within 4 standard errors of ``true_jnd_rates`` (random effects pull it
    towards 1/2), and the identical pair's rows are catch trials."""
    from analysis.simulation import simulate_jnd_responses, true_jnd_rates

    visibility = {"q1": -1.5, "q2": 0.5, "q3": 1.5}
    answers = simulate_jnd_responses(
        visibility, 600, 300, 50, identical=-2.5, observer_sd=0.5, image_sd=0.4, seed=8
    )
    assert set(answers.loc[answers["trial_kind"] == "catch", "condition_left"]) == {"reference"}
    rates = different_rates(jnd_trials(answers)).set_index("condition")
    truth = true_jnd_rates({**visibility, IDENTICAL: -2.5}, observer_sd=0.5, image_sd=0.4)
    for condition, rate in truth.items():
        row = rates.loc[condition]
        assert abs(row["rate_different"] - rate) < 4 * row["se"] < 0.04, condition
    no_effects = true_jnd_rates(visibility)
    assert no_effects["q1"] < truth["q1"] and no_effects["q3"] > truth["q3"]
