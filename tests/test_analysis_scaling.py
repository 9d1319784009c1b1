"""Bradley–Terry and Thurstone scales against choix, published values and simulations."""

from __future__ import annotations

import choix
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.scaling import (
    AUTO_ALPHA,
    _bootstrap_counts,
    _replicate_alpha,
    anchor_scale,
    cell_counts,
    fit_scale,
    fit_scale_batch,
    scale_conditions,
    significance_matrix,
    split_half_reliability,
    strongly_connected,
    win_matrix,
)
from analysis.simulation import population_scale, simulate_responses, true_pair_rates

# Stigler (1994) journal citations as used by Agresti (2002, Categorical Data Analysis,
# p. 448) and shipped as `citations` in the R package BradleyTerry2 (its countsToBinomial
# test lists these win counts; winner = cited journal). Source:
# https://rdrr.io/cran/BradleyTerry2/src/tests/testthat/test-countsToBinomial.R
JOURNALS = ["Biometrika", "Comm Statist", "JASA", "JRSS-B"]
CITATIONS = [  # (journal1, journal2, times 1 cited by 2, times 2 cited by 1)
    ("Biometrika", "Comm Statist", 730, 33),
    ("Biometrika", "JASA", 498, 320),
    ("Biometrika", "JRSS-B", 221, 284),
    ("Comm Statist", "JASA", 68, 813),
    ("Comm Statist", "JRSS-B", 17, 276),
    ("JASA", "JRSS-B", 142, 325),
]


def _citation_votes() -> pd.DataFrame:
    rows = []
    for a, b, wins_a, wins_b in CITATIONS:
        rows += [(a, b, a)] * wins_a + [(a, b, b)] * wins_b
    frame = pd.DataFrame(rows, columns=["condition_left", "condition_right", "chosen_condition"])
    frame["participant"] = [f"p{i % 25}" for i in range(len(frame))]
    return frame


def test_stigler_citations_match_published_bradley_terry_estimates():
    """Design note: Comm Statist -2.9491, JASA -0.4796, JRSS-B 0.2690, Biometrika fixed 0."""
    result = scale_conditions(_citation_votes(), "bt", anchor="Biometrika", n_boot=0)
    got = result.scale.set_index("condition")["estimate"]
    assert result.strongly_connected and result.alpha == 0
    assert got["Biometrika"] == 0
    assert got["Comm Statist"] == pytest.approx(-2.9491, abs=1e-4)
    assert got["JASA"] == pytest.approx(-0.4796, abs=1e-4)
    assert got["JRSS-B"] == pytest.approx(0.2690, abs=1e-4)


def _choix_data(wins: np.ndarray) -> list[tuple[int, int]]:
    data = []
    for i in range(wins.shape[0]):
        for j in range(wins.shape[0]):
            data += [(i, j)] * int(wins[i, j])
    return data


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bradley_terry_matches_choix_ml_and_map(seed):
    rng = np.random.default_rng(seed)
    strength = rng.normal(0, 1, 6)
    wins = np.zeros((6, 6))
    for _ in range(600):
        i, j = rng.choice(6, 2, replace=False)
        if rng.random() < 1 / (1 + np.exp(strength[j] - strength[i])):
            wins[i, j] += 1
        else:
            wins[j, i] += 1
    assert strongly_connected(wins)
    data = _choix_data(wins)
    ml = fit_scale(wins, "bt", 0.0)
    ref = choix.opt_pairwise(6, data, alpha=1e-9, method="BFGS", tol=1e-10)
    assert np.allclose(ml, ref - ref.mean(), atol=2e-4)
    for alpha in (0.1, 1.0):
        # choix's objective adds alpha * sum(params**2); ours alpha / 2 * sum(s**2)
        mine = fit_scale(wins, "bt", alpha)
        ref = choix.opt_pairwise(6, data, alpha=alpha / 2, method="BFGS", tol=1e-10)
        assert np.allclose(mine, ref, atol=2e-4)


def test_not_strongly_connected_graph_is_regularised_like_choix():
    # c always loses: the ML estimate of c is minus infinity.
    votes = pd.DataFrame(
        [("a", "b", "a")] * 6
        + [("a", "b", "b")] * 4
        + [("a", "c", "a")] * 5
        + [("b", "c", "b")] * 5,
        columns=["condition_left", "condition_right", "chosen_condition"],
    )
    votes["participant"] = [f"p{i % 4}" for i in range(len(votes))]
    wins = win_matrix(votes)
    assert not strongly_connected(wins)
    with pytest.raises(ValueError, match="strongly connected"):
        fit_scale(wins, "bt", 0.0)
    result = scale_conditions(votes, "bt", n_boot=20)
    assert not result.strongly_connected and result.alpha == AUTO_ALPHA
    ref = choix.opt_pairwise(3, _choix_data(wins), alpha=AUTO_ALPHA / 2, method="BFGS", tol=1e-10)
    assert np.allclose(result.scale["estimate"], ref - ref.mean(), atol=1e-3)
    assert np.all(np.isfinite(result.scale[["ci_low", "ci_high"]].to_numpy()))


def test_thurstone_unit_is_one_jod_at_75_percent():
    """Two conditions, 75 % preference exactly: the ML difference is 1 JOD."""
    wins = np.array([[0.0, 750.0], [250.0, 0.0]])
    q = fit_scale(wins, "thurstone", 0.0)
    assert q[0] - q[1] == pytest.approx(1.0, abs=1e-5)  # 1.4826 is 1/z(0.75) rounded
    assert stats.norm.cdf((q[0] - q[1]) / 1.4826) == pytest.approx(0.75, abs=1e-4)
    b = fit_scale(wins, "bt", 0.0)
    assert b[0] - b[1] == pytest.approx(np.log(3), abs=1e-6)  # logit of 0.75


def test_anchor_and_significance_matrix():
    truth = {"a": 0.0, "b": 0.1, "c": 2.0}
    votes = simulate_responses(truth, 30, 8, 40, seed=5)
    result = scale_conditions(votes, "thurstone", anchor="a", n_boot=200, seed=1)
    scale = result.scale.set_index("condition")
    assert scale.loc["a", "estimate"] == 0 and scale.loc["a", "ci_low"] == 0
    sig = result.significance.set_index(["condition_a", "condition_b"])
    assert sig.loc[("a", "c"), "significant"] and sig.loc[("b", "c"), "significant"]
    assert sig.loc[("a", "c"), "difference"] < 0
    assert sig.loc[("a", "b"), "p_value"] > sig.loc[("a", "c"), "p_value"]
    assert np.allclose(anchor_scale(np.array([1.0, 2.0, 3.0]), ["x", "y", "z"], None), [-1, 0, 1])
    with pytest.raises(ValueError, match="anchor"):
        anchor_scale(np.zeros(3), ["x", "y", "z"], "w")


@pytest.mark.slow
def test_simulated_studies_recover_true_jod_at_about_nominal_rate():
    """30 simulated studies with participant and image effects; each true difference to
    the anchor (the population scale the pooled fit estimates) inside its 90 % two-way
    interval in about 90 % of studies (binomial tolerance). ``bench/bench_inference.py``
    and ``tests/test_analysis_calibration.py`` check this at scale."""
    truth = {"a": 0.0, "b": 0.5, "c": 1.0, "d": -0.5}
    target = dict(zip(truth, population_scale(truth, observer_sd=0.3, image_sd=0.3), strict=True))
    hits, total = 0, 0
    for seed in range(30):
        votes = simulate_responses(
            truth, 20, 10, 30, observer_sd=0.3, image_sd=0.3, seed=100 + seed
        )
        result = scale_conditions(
            votes, "thurstone", prior="none", anchor="a", n_boot=150, level=0.9, seed=seed
        )
        scale = result.scale.set_index("condition")
        for name in ("b", "c", "d"):
            expected = target[name] - target["a"]
            hits += scale.loc[name, "ci_low"] <= expected <= scale.loc[name, "ci_high"]
            total += 1
    rate = hits / total
    low, high = stats.binom.ppf([0.001, 0.999], total, 0.9) / total
    assert low - 0.05 <= rate <= high, rate


def test_batched_newton_matches_one_fit_at_a_time():
    rng = np.random.default_rng(3)
    wins = rng.poisson(20, (40, 5, 5)).astype(float)
    wins[:, np.arange(5), np.arange(5)] = 0
    wins[0, 2, :] = 0  # condition 2 never wins in replicate 0: needs the ridge
    alpha = np.where(np.arange(40) == 0, AUTO_ALPHA, 0.0)
    for model in ("bt", "thurstone"):
        batch = fit_scale_batch(wins, model, alpha)
        single = np.array([fit_scale(w, model, a) for w, a in zip(wins, alpha, strict=True)])
        assert np.allclose(batch, single, atol=1e-9)
    assert list(_replicate_alpha(wins, 0.0)) == list(alpha)


def test_two_way_interval_columns_units_and_anchor():
    truth = {"a": 0.0, "b": 0.4, "c": 0.8}
    votes = simulate_responses(truth, 12, 6, 30, observer_sd=0.4, image_sd=0.4, seed=4)
    jod = scale_conditions(votes, "thurstone", n_boot=100)
    bt = scale_conditions(votes, "bt", anchor="b", n_boot=100)
    assert (jod.scale["unit"] == "JOD").all() and (bt.scale["unit"] == "logit").all()
    assert (bt.significance["unit"] == "logit").all()
    assert jod.scale["interval"].str.startswith("two-way cluster bootstrap").all()
    assert jod.variance.combine == "two-way"
    assert set(jod.replicates) == {"participant", "image", "cell"}
    assert jod.variance.clusters == {
        "participant": 12,
        "image": 6,
        "cell": votes.groupby(["participant", "image_id"]).ngroups,
    }
    anchored = bt.scale.set_index("condition").loc["b"]
    assert anchored["estimate"] == 0 and anchored["ci_low"] == 0 == anchored["ci_high"]
    assert np.allclose(jod.scale["estimate"].sum(), 0, atol=1e-12)
    # per contrast: V = V_P + V_I - V_C, never below V_C, t with its df
    rows = np.eye(3) - 1 / 3
    parts = {k: np.einsum("mk,kl,ml->m", rows, v, rows) for k, v in jod.variance.components.items()}
    expected = np.maximum(parts["participant"] + parts["image"] - parts["cell"], parts["cell"])
    assert np.allclose(jod.scale["se"] ** 2, expected)
    half = stats.t.isf(0.025, jod.scale["df"]) * jod.scale["se"]
    assert np.allclose(jod.scale["ci_high"] - jod.scale["estimate"], half)
    sig = jod.significance
    assert np.allclose(sig["p_value"], 2 * stats.t.sf(np.abs(sig["t"]), sig["df"]))


def test_bootstrap_and_sandwich_variances_agree():
    truth = {"a": 0.0, "b": 0.3, "c": 0.6, "d": 0.9}
    votes = simulate_responses(truth, 20, 10, 60, observer_sd=0.5, image_sd=0.4, seed=8)
    boot = scale_conditions(votes, "thurstone", n_boot=2000, seed=2)
    sandwich = scale_conditions(votes, "thurstone", interval="two-way-sandwich")
    assert sandwich.scale["interval"].str.startswith("two-way cluster-robust sandwich").all()
    for level in ("participant", "image", "cell"):
        a = np.diag(boot.variance.components[level])
        b = np.diag(sandwich.variance.components[level])
        assert np.allclose(a, b, rtol=0.15), (level, a, b)


def test_pooled_cell_resampling_matches_plain_resampling_in_distribution():
    """Cells with identical counts are pooled before resampling; the replicates have the
    mean and covariance of plain resampling of G cells: mean = total, covariance =
    G x the (population) covariance of the cells' count rows."""
    votes = simulate_responses({"a": 0, "b": 1, "c": 2}, 6, 40, 20, seed=1)
    cells = cell_counts(votes, ["a", "b", "c"])
    matrix = cells.by("cell")
    rows = matrix.toarray()
    assert len(np.unique(rows, axis=0)) < len(rows)  # some cells do get pooled
    boot = _bootstrap_counts(matrix, 20000, np.random.default_rng(0))
    assert np.allclose(boot.mean(axis=0), rows.sum(axis=0), rtol=0.02, atol=0.05)
    expected = len(rows) * np.cov(rows, rowvar=False, bias=True)
    got = np.cov(boot, rowvar=False)
    assert np.allclose(got, expected, atol=0.1 * np.abs(expected).max())
    assert cells.by("participant").shape[0] == 6 and cells.by("image").shape[0] == 40
    assert np.allclose(cells.total(), win_matrix(votes, ["a", "b", "c"]))


def test_fewer_than_five_images_or_no_image_column_falls_back_to_participants():
    votes = simulate_responses({"a": 0, "b": 1, "c": 2}, 10, 3, 30, seed=2)
    result = scale_conditions(votes, "thurstone", n_boot=50)
    assert result.variance.combine == "participants"
    assert result.scale["interval"].str.contains("fewer than 5 images").all()
    assert (result.scale["df"] == 9).all()
    no_images = scale_conditions(votes.drop(columns="image_id"), "bt", n_boot=50)
    assert no_images.variance.clusters == {"participant": 10}


def test_significance_matrix_still_takes_bootstrap_replicates():
    reps = np.random.default_rng(0).normal(0, 0.1, (400, 3))
    table = significance_matrix(["x", "y", "z"], np.array([0.0, 0.05, 1.0]), reps)
    assert np.isinf(table["df"]).all()
    assert table.set_index(["condition_a", "condition_b"]).loc[("x", "z"), "significant"]
    assert table["interval"].iloc[0].startswith("bootstrap (400)")


def test_population_rates_match_a_large_simulation():
    """The marginal rates (the estimand of pooled rates and of the population scale)
    agree with a big simulated study; the pair-difference SD is what observer_sd and
    image_sd say (Thurstone: exact attenuation by 1.4826 / sqrt(1.4826^2 + tau^2))."""
    truth = {"a": 0.0, "b": 1.0}
    for model in ("thurstone", "bt"):
        votes = simulate_responses(
            truth, 4000, 2000, 50, observer_sd=1.0, image_sd=0.8, seed=3, model=model
        )
        rate = (votes["chosen_condition"] == "b").mean()
        expected = true_pair_rates(truth, [("b", "a")], model, observer_sd=1.0, image_sd=0.8)
        # sampling SD of the rate ~0.006 (participants and images are random too)
        assert rate == pytest.approx(expected[0], abs=0.02)
        assert expected[0] < true_pair_rates(truth, [("b", "a")], model)[0] - 0.04
    scale = population_scale(truth, observer_sd=1.0, image_sd=0.8)
    assert scale[1] - scale[0] == pytest.approx(1.4826 / np.sqrt(1.4826**2 + 1.64))


def test_split_half_reliability_is_high_for_clear_differences():
    votes = simulate_responses({"a": 0.0, "b": 1.0, "c": 2.0, "d": 3.0}, 30, 5, 40, seed=2)
    table = split_half_reliability(votes, n_splits=10)
    assert table.loc[0, "half_correlation"] > 0.9
    assert table.loc[0, "spearman_brown"] >= table.loc[0, "half_correlation"]


def test_split_half_reliability_of_halves_that_always_disagree_is_undefined_not_an_error():
    # Two participants with opposite preferences: every split puts one in each half, the
    # half scales correlate at exactly -1 and Spearman-Brown (2r / (1 + r)) is undefined.
    votes = simulate_responses({"a": 0.0, "b": 1.0}, 2, 3, 10, seed=0)
    first = votes["participant"] == votes["participant"].iloc[0]
    votes["chosen_condition"] = np.where(first, "a", "b")
    table = split_half_reliability(votes, n_splits=5)
    assert table.loc[0, "half_correlation"] == pytest.approx(-1.0)
    assert np.isnan(table.loc[0, "spearman_brown"])
