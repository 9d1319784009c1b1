"""Clustered inference, position bias, agreement and planning against references."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy import special, stats
from statsmodels.stats.inter_rater import fleiss_kappa

from analysis.agreement import fleiss_kappa_pairs, kendall_u, position_bias
from analysis.clustered import (
    POOLED_RATE_METHOD,
    TWO_WAY_RATE_METHOD,
    cluster_bootstrap,
    cluster_bootstrap_rates,
    cluster_robust_glm,
    mixed_logistic,
    per_participant_tests,
    two_way_rate,
    two_way_rate_tests,
)
from analysis.planning import design_effect, exact_power, planning_table, votes_for_halfwidth
from analysis.simulation import simulate_responses, true_pair_rates

TRUTH = {"a": 0.0, "b": 0.6, "c": 1.2}


@pytest.fixture(scope="module")
def votes():
    return simulate_responses(
        TRUTH, 30, 12, 36, observer_sd=0.4, image_sd=0.3, left_bias=0.3, seed=11
    )


def test_per_participant_tests_match_scipy(votes):
    table = per_participant_tests(votes).set_index(["condition_a", "condition_b"])
    ab = votes[{"a", "b"} == votes[["condition_left", "condition_right"]].apply(set, axis=1)]
    ab = votes.loc[ab.index]
    rates = (ab["chosen_condition"] == "a").groupby(ab["participant"]).mean()
    assert table.loc[("a", "b"), "n_participants"] == len(rates)
    assert table.loc[("a", "b"), "p_t"] == pytest.approx(stats.ttest_1samp(rates, 0.5).pvalue)
    assert table.loc[("a", "b"), "p_wilcoxon"] == pytest.approx(stats.wilcoxon(rates - 0.5).pvalue)


def test_cluster_glm_intercept_is_the_pair_logit_and_clustering_widens(votes):
    plain = cluster_robust_glm(votes, sides_recorded=False).set_index(
        ["condition_a", "condition_b"]
    )
    row = plain.loc[("a", "c")]
    ac = votes[votes["condition_left"].isin(["a", "c"]) & votes["condition_right"].isin(["a", "c"])]
    rate = (ac["chosen_condition"] == "a").mean()
    assert row["log_odds"] == pytest.approx(special.logit(rate), abs=1e-8)
    naive = sm.GLM(
        (ac["chosen_condition"] == "a").astype(float).to_numpy(),
        np.ones((len(ac), 1)),
        family=sm.families.Binomial(),
    ).fit()
    assert row["se"] > naive.bse[0]  # participants and images are clusters: wider
    assert row["ci_low"] < rate < row["ci_high"]
    with_side = cluster_robust_glm(votes, sides_recorded=True)
    assert (with_side["side_log_odds"] > 0).all()  # simulated left bias shows up
    assert with_side["rate_a"].lt(0.5).all()  # a is the worst condition


def test_cluster_glm_uses_t_with_clusters_minus_one_df(votes):
    row = cluster_robust_glm(votes, sides_recorded=False).iloc[0]
    clusters = min(votes["participant"].nunique(), votes["image_id"].nunique())
    assert row["cov"].startswith("two-way") and row["df"] == clusters - 1
    t = row["log_odds"] / row["se"]
    assert row["p_value"] == pytest.approx(2 * stats.t.sf(abs(t), clusters - 1))
    assert row["p_value"] > 2 * stats.norm.sf(abs(t))  # more conservative than z


def test_cluster_glm_with_one_image_clusters_by_participant(votes):
    one_image = votes[votes["image_id"] == votes["image_id"].iloc[0]]
    row = (
        cluster_robust_glm(one_image, sides_recorded=False)
        .set_index(["condition_a", "condition_b"])
        .loc[("a", "c")]
    )
    assert row["cov"] == "cluster (participant); fewer than 5 images"
    assert np.isfinite(row["p_value"]) and row["df"] >= 4


def test_cluster_glm_is_not_estimated_from_a_handful_of_participants(votes):
    few = votes[votes["participant"].isin(votes["participant"].unique()[:3])]
    table = cluster_robust_glm(few, sides_recorded=True)
    assert table["cov"].str.startswith("not estimated").all()
    assert table["p_value"].isna().all()


def test_cluster_glm_leaves_out_a_side_term_that_separates_the_data(votes):
    # Pure position bias: the left image always wins, so side predicts every vote and a
    # model with a side term has no finite estimate; the side term is left out instead.
    biased = votes.copy()
    biased["chosen_condition"] = biased["condition_left"]
    biased["choice"] = "left"
    table = cluster_robust_glm(biased, sides_recorded=True)
    assert "side_log_odds" not in table or table["side_log_odds"].isna().all()
    assert np.isfinite(table["log_odds"]).all() and (table["log_odds"].abs() < 1).all()


def test_mixed_model_recovers_direction_and_states_its_sample(votes):
    table = mixed_logistic(votes, max_participants=12, max_images=8)
    assert (table["n_used"] <= table["n"]).all()
    ac = table.set_index(["condition_a", "condition_b"]).loc[("a", "c")]
    assert ac["log_odds"] < 0 and ac["ci_high"] < 0.5
    assert ac["participant_sd"] > 0


def test_cluster_bootstrap_rates_and_generic_bootstrap(votes):
    boot = cluster_bootstrap_rates(votes, n_boot=300, seed=1).set_index(
        ["condition_a", "condition_b"]
    )
    one_way = cluster_bootstrap_rates(votes, n_boot=300, seed=1, two_way=False)
    assert (boot["ci_low"] < boot["rate_a"]).all() and (boot["rate_a"] < boot["ci_high"]).all()
    assert boot["boot_se"].mean() > one_way["boot_se"].mean() * 0.9
    ab = votes[votes["condition_left"].isin(["a", "b"]) & votes["condition_right"].isin(["a", "b"])]
    reps = cluster_bootstrap(
        ab, lambda f: (f["chosen_condition"] == "a").mean(), n_boot=300, seed=1
    )
    assert reps.std(ddof=1) == pytest.approx(
        one_way.set_index(["condition_a", "condition_b"]).loc[("a", "b"), "boot_se"], rel=0.35
    )


@pytest.mark.slow
def test_cluster_bootstrap_interval_covers_truth_at_about_nominal_rate():
    """Studies with observer heterogeneity: the participant bootstrap interval of a pair's
    rate contains the simulated truth in ~90 % of 60 studies."""
    truth = {"a": 0.0, "b": 0.8}
    # with observer shifts u ~ N(0, 0.6^2) the population rate is E[Phi((d + u) / 1.4826)]
    shifts = np.random.default_rng(0).normal(0, 0.6, 200_000)
    true_rate = stats.norm.cdf((-0.8 + shifts) / 1.4826).mean()
    assert true_rate > true_pair_rates(truth, [("a", "b")])[0]  # heterogeneity pulls to 1/2
    hits = 0
    runs = 60
    for seed in range(runs):
        votes = simulate_responses(truth, 25, 5, 16, observer_sd=0.6, seed=500 + seed)
        boot = cluster_bootstrap_rates(votes, n_boot=200, level=0.9, seed=seed, two_way=False)
        hits += boot.loc[0, "ci_low"] <= true_rate <= boot.loc[0, "ci_high"]
    low = stats.binom.ppf(0.001, runs, 0.9)
    assert hits >= low - 3, hits


def _sandwich(y, groups):
    """statsmodels' cluster-robust variance of a mean, without its small-sample factor."""
    fit = sm.OLS(y, np.ones((len(y), 1))).fit(
        cov_type="cluster", cov_kwds={"groups": groups, "use_correction": False}
    )
    return float(fit.cov_params()[0, 0])


def _statsmodels_parts(votes, a, b):
    """A pair's votes for ``a`` and its one-way variances by participant, image and cell
    from statsmodels' cluster-robust variance of a mean, times G / (G - 1)."""
    from analysis.pairs import ordered_pairs

    pairs = ordered_pairs(votes)
    rows = (pairs["condition_a"] == a) & (pairs["condition_b"] == b)
    y = pairs.loc[rows, "win_a"].to_numpy(dtype=float)
    p = pd.factorize(votes.loc[rows, "participant"])[0]
    i = pd.factorize(votes.loc[rows, "image_id"])[0]
    cell = pd.factorize(pd.Series(p).astype(str) + "/" + pd.Series(i).astype(str))[0]
    parts = {}
    for name, g in (("p", p), ("i", i), ("c", cell)):
        groups = len(np.unique(g))
        parts[name] = (_sandwich(y, g) * groups / (groups - 1), groups)
    return y, parts


def test_two_way_rate_variance_is_statsmodels_sandwiches_with_shares_pooled_over_pairs(votes):
    table = two_way_rate_tests(votes).set_index(["condition_a", "condition_b"])
    every = {pair: _statsmodels_parts(votes, *pair) for pair in table.index}
    weights = np.array([len(y) for y, _ in every.values()], dtype=float)
    shares = {
        k: np.average(
            [parts[k][0] / parts["c"][0] - 1 for _, parts in every.values()], weights=weights
        )
        for k in ("p", "i")
    }
    pooled_rows = table["interval"] == POOLED_RATE_METHOD
    assert pooled_rows.sum() >= len(table) - 1  # alike pairs: (nearly) all pooled
    for pair in table.index[pooled_rows]:
        y, parts = every[pair]
        row = table.loc[pair]
        expected = parts["c"][0] * (1 + max(shares["p"] + shares["i"], 0))
        assert row["se"] ** 2 == pytest.approx(expected, rel=1e-10)
        active = [parts[k][1] for k in ("p", "i") if shares[k] > 0]
        assert row["df"] == (min(active) if active else parts["c"][1]) - 1
        assert row["rate_a"] == pytest.approx(y.mean())
        t = (y.mean() - 0.5) / row["se"]
        assert row["p_value"] == pytest.approx(2 * stats.t.sf(abs(t), row["df"]))
        crit = stats.t.isf(0.025, row["df"])
        assert row["ci_low"] == pytest.approx(y.mean() - crit * row["se"])
        assert row["ci_high"] == pytest.approx(y.mean() + crit * row["se"])
        # image and participant effects make the interval wider than the binomial one
        assert row["se"] > np.sqrt(y.mean() * (1 - y.mean()) / len(y))
    assert table["p_holm"].ge(table["p_value"]).all()


def test_two_way_rate_is_the_pairs_own_sandwiches_combined(votes):
    """``two_way_rate`` alone (one quantity: position bias, JND, metric agreement, and a
    pair clustered beyond the others): V_p + V_i - V_c never below V_c, Satterthwaite df."""
    from analysis.pairs import ordered_pairs

    y, parts = _statsmodels_parts(votes, "a", "c")
    pairs = ordered_pairs(votes)
    rows = (pairs["condition_a"] == "a") & (pairs["condition_b"] == "c")
    result = two_way_rate(y, votes.loc[rows, "participant"], votes.loc[rows, "image_id"])
    combined = parts["p"][0] + parts["i"][0] - parts["c"][0]
    assert result["se"] ** 2 == pytest.approx(max(combined, parts["c"][0]), rel=1e-10)
    if combined > parts["c"][0]:  # Satterthwaite over the three components
        spread = sum(v**2 / (g - 1) for v, g in parts.values())
        assert result["df"] == pytest.approx(
            min(combined**2 / spread, sum(g - 1 for _, g in parts.values()))
        )
    assert result["interval"] == TWO_WAY_RATE_METHOD


def test_a_pair_clustered_beyond_the_others_keeps_its_own_variance():
    """Pooling the shares assumes the pairs are alike; one pair whose votes depend on the
    image far more than the others' (image SD 1.2 JOD there, none elsewhere) keeps its own
    two-way variance, which the pooled one would understate, and the rest stay pooled."""
    from analysis.pairs import ordered_pairs

    equal = {c: 0.0 for c in "abcde"}
    calm = simulate_responses(equal, 20, 10, 60, seed=21)
    wild = simulate_responses(equal, 20, 10, 60, image_sd=1.2, seed=22)

    def pair_ab(frame):
        sides = frame[["condition_left", "condition_right"]]
        return sides.isin(["a", "b"]).all(axis=1)

    main = pd.concat([calm[~pair_ab(calm)], wild[pair_ab(wild)]], ignore_index=True)
    table = two_way_rate_tests(main).set_index(["condition_a", "condition_b"])
    votes = main[pair_ab(main)]
    own = two_way_rate(
        ordered_pairs(votes)["win_a"].to_numpy(float), votes["participant"], votes["image_id"]
    )
    assert table.loc[("a", "b"), "interval"] == TWO_WAY_RATE_METHOD
    assert table.loc[("a", "b"), "se"] == pytest.approx(own["se"])
    assert (table.drop(index=("a", "b"))["interval"] == POOLED_RATE_METHOD).all()
    # the average would have understated it: the pair's own variance is far above
    assert table.loc[("a", "b"), "se"] > 1.5 * table.drop(index=("a", "b"))["se"].max()


def test_two_way_rate_falls_back_to_participants_with_few_images():
    few = simulate_responses(TRUTH, 12, 3, 30, observer_sd=0.4, seed=3)
    table = two_way_rate_tests(few)
    assert table["interval"].str.contains("fewer than 5 images").all()
    assert (table["df"] == 11).all()
    # no spread at all: nothing to test against, NaN rather than a zero-width interval
    flat = two_way_rate(np.ones(20), np.repeat(np.arange(5), 4), np.tile(np.arange(4), 5))
    assert np.isnan(flat["p_value"]) and np.isnan(flat["ci_low"]) and flat["rate"] == 1.0


def test_position_bias_counts_and_clustered_test(votes):
    overall, per = position_bias(votes)
    left = (votes["choice"] == "left").to_numpy(dtype=float)
    assert overall.loc[0, "left_choices"] == int(left.sum())
    reference = two_way_rate(left, votes["participant"], votes["image_id"])
    assert overall.loc[0, "p_value"] == pytest.approx(reference["p_value"])
    assert overall.loc[0, "left_rate"] > 0.5 and overall.loc[0, "p_value"] < 0.05  # simulated bias
    assert overall.loc[0, "ci_low"] > 0.5
    assert len(per) == 30 and per["n"].sum() == len(votes)
    first = per.iloc[0]
    assert first["p_value"] == pytest.approx(
        stats.binomtest(int(first["left_choices"]), int(first["n"])).pvalue
    )


def test_fleiss_kappa_matches_statsmodels_with_equal_raters():
    rng = np.random.default_rng(0)
    rows = []
    for image in range(20):
        p = rng.uniform(0.1, 0.9)
        for rater in range(6):
            chosen = "x" if rng.random() < p else "y"
            rows.append((f"r{rater}", f"i{image}", "x", "y", chosen))
    votes = pd.DataFrame(
        rows,
        columns=[
            "participant",
            "image_id",
            "condition_left",
            "condition_right",
            "chosen_condition",
        ],
    )
    counts = votes.groupby("image_id")["chosen_condition"].apply(
        lambda s: [int((s == "x").sum()), int((s == "y").sum())]
    )
    reference = fleiss_kappa(np.array(counts.tolist()), method="fleiss")
    assert fleiss_kappa_pairs(votes) == pytest.approx(reference)


def test_kendall_u_classic_formula_and_extremes():
    """Balanced design: u = 2 sum C(a_ij, 2) / (C(m, 2) C(t, 2)) - 1 (Kendall & Babington Smith)."""
    rng = np.random.default_rng(1)
    names = ["p", "q", "r", "s"]
    m = 7
    rows = []
    for obs in range(m):
        for i in range(4):
            for j in range(i + 1, 4):
                winner = names[i] if rng.random() < 0.7 else names[j]
                rows.append((f"o{obs}", names[i], names[j], winner))
    votes = pd.DataFrame(
        rows, columns=["participant", "condition_left", "condition_right", "chosen_condition"]
    )
    wins = {}
    for row in votes.itertuples():
        wins[
            (
                row.chosen_condition,
                row.condition_left
                if row.chosen_condition != row.condition_left
                else row.condition_right,
            )
        ] = (
            wins.get(
                (
                    row.chosen_condition,
                    row.condition_left
                    if row.chosen_condition != row.condition_left
                    else row.condition_right,
                ),
                0,
            )
            + 1
        )
    sigma = sum(special.comb(a, 2) for a in wins.values())
    classic = 2 * sigma / (special.comb(m, 2) * special.comb(4, 2)) - 1
    assert kendall_u(votes) == pytest.approx(classic)
    unanimous = votes.assign(chosen_condition=votes["condition_left"])
    assert kendall_u(unanimous) == 1.0


def _critical_counts(max_n: int, alpha=0.05) -> list[int]:
    """Independent reference: for each n, the largest k <= n/2 with scipy's binomtest
    p-value <= alpha (-1 if none); binomtest's p-value rises with k below n/2, so bisect."""
    out = []
    for n in range(1, max_n + 1):
        lo, hi = -1, n // 2
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if stats.binomtest(mid, n, 0.5).pvalue <= alpha:
                lo = mid
            else:
                hi = mid - 1
        out.append(lo)
    return out


def _votes_needed_by_scipy(p: float, critical: list[int], power=0.8) -> int:
    """Smallest n with power >= target for every larger n up to the search limit."""
    ok = []
    for n, c in enumerate(critical, start=1):
        if c < 0:
            ok.append(False)
            continue
        ok.append(stats.binom.cdf(c, n, p) + stats.binom.sf(n - c - 1, n, p) >= power)
    ok = np.array(ok)
    return int(np.flatnonzero(~ok)[-1] + 2)


@pytest.mark.slow
def test_votes_needed_reproduce_the_design_note_via_scipy():
    """analysis.md: p = .60 ~210 votes, .65 ~97, .70 ~54, .75 ~35 (alpha .05, power .8)."""
    table = planning_table((0.6, 0.65, 0.7, 0.75))
    critical = _critical_counts(300)
    expected = [_votes_needed_by_scipy(p, critical) for p in (0.6, 0.65, 0.7, 0.75)]
    assert table["votes_needed"].tolist() == expected
    assert expected == [210, 97, 54, 35]
    assert exact_power(35, 0.75) >= 0.8 > exact_power(34, 0.75)
    inflated = planning_table((0.7,), votes_per_participant=5, icc=0.1)
    assert (
        inflated.loc[0, "design_effect"]
        == pytest.approx(design_effect(5, 0.1))
        == pytest.approx(1.4)
    )
    assert inflated.loc[0, "votes_needed_clustered"] == int(np.ceil(54 * 1.4))


def test_votes_for_halfwidth_uses_wilson():
    from statsmodels.stats.proportion import proportion_confint

    n = votes_for_halfwidth(0.05)
    low, high = proportion_confint(n / 2, n, method="wilson")
    assert (high - low) / 2 <= 0.05
    low, high = proportion_confint((n - 30) / 2, n - 30, method="wilson")
    assert (high - low) / 2 > 0.05
