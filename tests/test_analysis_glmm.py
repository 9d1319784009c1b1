"""The crossed random-effects logistic GLMM (analysis.glmm) against R's lme4, its edge
cases, and the level of the per-pair test it gives."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy import special, stats

from analysis.glmm import PAIR_TEST_COLUMNS, fit_glmm, glmm_pair_tests
from analysis.intervals import holm_adjust
from tests.glmm_support import (
    glmer_reference,
    rscript_with_lme4,
    simulate_crossed,
    small_report_study,
)
from tests.support import require_component


def crossed_pair(
    seed: int,
    n_participants: int,
    n_images: int,
    votes_each: int,
    intercept: float,
    side: float | None,
    sd_participant: float,
    sd_image: float,
) -> pd.DataFrame:
    """One pair's votes on the logit scale: y ~ Bernoulli(expit(intercept + side * a_left
    + u_participant + v_image)); a_left = +-1/2 at random (left out when side is None)."""
    rng = np.random.default_rng(seed)
    n = n_participants * votes_each
    participant = np.repeat(np.arange(n_participants), votes_each)
    image = rng.integers(0, n_images, n)
    a_left = rng.choice([-0.5, 0.5], n)
    eta = (
        intercept
        + (side or 0.0) * a_left
        + rng.normal(0, sd_participant, n_participants)[participant]
        + rng.normal(0, sd_image, n_images)[image]
    )
    frame = pd.DataFrame(
        {
            "y": (rng.random(n) < special.expit(eta)).astype(int),
            "participant": [f"p{i:02d}" for i in participant],
            "image": [f"i{i:02d}" for i in image],
        }
    )
    if side is not None:
        frame.insert(1, "a_left", a_left)
    return frame


def fit_frame(frame: pd.DataFrame):
    columns = [np.ones(len(frame))]
    names = ["(Intercept)"]
    if "a_left" in frame:
        columns.append(frame["a_left"].to_numpy())
        names.append("a_left")
    return fit_glmm(
        frame["y"].to_numpy(),
        np.column_stack(columns),
        [frame["participant"].to_numpy(), frame["image"].to_numpy()],
        names=tuple(names),
        factors=("participant", "image"),
    )


# (seed, participants, images, votes per participant, intercept, side, SDs)
LME4_CASES = [
    (1, 30, 12, 40, 0.4, 0.3, 0.8, 0.5),  # 1,200 votes, side term, both SDs clearly > 0
    (2, 20, 10, 30, -0.2, None, 0.5, 0.3),  # 600 votes, no side term
    (3, 10, 5, 60, 0.3, 0.2, 0.7, 0.6),  # few clusters: 10 participants, 5 images
    (4, 25, 8, 24, -0.6, 0.5, 1.2, 0.0),  # no image effect: image SD near/at the boundary
]


@pytest.fixture(scope="module")
def lme4_fits(tmp_path_factory):
    require_component(
        rscript_with_lme4(),
        "R with lme4 (Rscript -e 'library(lme4)')",
        "apt-get install r-cran-lme4",
    )
    frames = [crossed_pair(*case) for case in LME4_CASES]
    references = glmer_reference(frames, tmp_path_factory.mktemp("lme4"))
    return [(frame, fit_frame(frame), ref) for frame, ref in zip(frames, references, strict=True)]


@pytest.mark.parametrize("case", range(len(LME4_CASES)))
def test_fixed_effects_and_standard_errors_match_glmer(lme4_fits, case):
    frame, fit, ref = lme4_fits[case]
    assert fit.converged and fit.vcov == "hessian"
    for j, name in enumerate(fit.names):
        # estimates within 2 % of glmer's SE (seen: 0.4 %); SEs from the finite-difference
        # Hessian (glmer's default vcov) within 3 % (seen: 1.4 %, the side term next to
        # a near-zero SD), conditional SEs within 0.5 % (seen: 0.02 %); the issue asks
        # for 10 %
        assert fit.beta[j] == pytest.approx(ref[name], abs=0.02 * ref[f"{name}_se"]), name
        assert fit.se[j] == pytest.approx(ref[f"{name}_se"], rel=0.03), name
        assert fit.se_conditional[j] == pytest.approx(ref[f"{name}_se_conditional"], rel=0.005), (
            name
        )
    # random-effect SDs close; our Laplace likelihood is at least glmer's (same maximum)
    assert fit.sd[0] == pytest.approx(ref["sd_participant"], abs=0.005)
    assert fit.sd[1] == pytest.approx(ref["sd_image"], abs=0.005)
    assert fit.loglik >= ref["loglik"] - 1e-3
    assert fit.loglik == pytest.approx(ref["loglik"], abs=0.05)
    if ref["singular"]:
        assert fit.singular


def test_boundary_fit_is_the_plain_logistic_glm():
    # Every participant x image cell has 2 wins in 5 votes (balanced): no variation between
    # participants or images, so both SDs are 0 and the GLMM is statsmodels' GLM.
    rows = []
    for p in range(6):
        for i in range(4):
            for v in range(5):
                rows.append((f"p{p}", f"i{i}", int(v < 2)))
    frame = pd.DataFrame(rows, columns=["participant", "image", "y"])
    fit = fit_frame(frame)
    glm = sm.GLM(frame["y"], np.ones((len(frame), 1)), family=sm.families.Binomial()).fit()
    assert fit.boundary == (True, True) and np.all(fit.sd == 0)
    assert fit.beta[0] == pytest.approx(glm.params.iloc[0], abs=1e-6)
    assert fit.se[0] == pytest.approx(glm.bse.iloc[0], rel=1e-3)
    assert fit.se_conditional[0] == pytest.approx(glm.bse.iloc[0], rel=1e-6)
    assert fit.deviance == pytest.approx(glm.deviance, abs=1e-6)  # Bernoulli: -2 loglik
    assert np.isinf(fit.df[0])  # no variance component: the Wald statistic is a z


def test_boundary_fit_with_a_side_term_matches_glm():
    rng = np.random.default_rng(5)
    rows = []
    for p in range(8):
        for i in range(5):
            for side in (-0.5, 0.5):
                wins = 3 if side > 0 else 2  # identical in every cell: SDs are 0
                rows += [(f"p{p}", f"i{i}", side, int(v < wins)) for v in range(5)]
    frame = pd.DataFrame(rows, columns=["participant", "image", "a_left", "y"])
    frame = frame.sample(frac=1, random_state=int(rng.integers(1000)))
    fit = fit_frame(frame)
    X = np.column_stack([np.ones(len(frame)), frame["a_left"]])
    glm = sm.GLM(frame["y"].to_numpy(), X, family=sm.families.Binomial()).fit()
    assert all(fit.boundary)
    np.testing.assert_allclose(fit.beta, glm.params, atol=1e-6)
    np.testing.assert_allclose(fit.se, glm.bse, rtol=1e-3)


def test_collapsed_binomial_rows_give_the_same_fit():
    frame = crossed_pair(7, 12, 6, 30, 0.3, None, 0.6, 0.4)
    cells = frame.groupby(["participant", "image"], as_index=False)["y"].agg(["sum", "size"])
    bernoulli = fit_frame(frame)
    binomial = fit_glmm(
        cells["sum"],
        np.ones((len(cells), 1)),
        [cells["participant"].to_numpy(), cells["image"].to_numpy()],
        trials=cells["size"],
    )
    assert binomial.beta[0] == pytest.approx(bernoulli.beta[0], abs=1e-6)
    assert binomial.se[0] == pytest.approx(bernoulli.se[0], rel=1e-4)
    np.testing.assert_allclose(binomial.sd, bernoulli.sd, atol=1e-5)
    assert binomial.deviance == pytest.approx(bernoulli.deviance, abs=1e-6)


def test_three_crossed_factors_and_a_data_frame_of_groups():
    rng = np.random.default_rng(8)
    n = 900
    groups = pd.DataFrame(
        {"p": rng.integers(0, 15, n), "i": rng.integers(0, 8, n), "s": rng.integers(0, 3, n)}
    )
    eta = 0.5 + rng.normal(0, 0.7, 15)[groups["p"]] + rng.normal(0, 0.5, 8)[groups["i"]]
    y = rng.random(n) < special.expit(eta)
    fit = fit_glmm(y, np.ones((n, 1)), groups)
    assert fit.factors == ("g0", "g1", "g2") and fit.n_levels == (15, 8, 3)
    assert fit.converged and 0.2 < fit.sd[0] < 1.5 and fit.se[0] > 0


def test_fit_glmm_refuses_inputs_without_a_finite_maximum():
    ones = np.ones((10, 1))
    codes = [np.arange(10) % 3, np.arange(10) % 2]
    with pytest.raises(ValueError, match="no variation"):
        fit_glmm(np.ones(10), ones, codes)
    with pytest.raises(ValueError, match="two levels"):
        fit_glmm(np.arange(10) % 2, ones, [np.zeros(10), np.arange(10) % 2])
    with pytest.raises(ValueError, match="rank deficient"):
        fit_glmm(np.arange(10) % 2, np.ones((10, 2)), codes)


def test_fit_is_fast_enough_for_a_report():
    # 10 pairs x 1,200 votes x 30 random effects (20 participants, 10 images): the issue
    # asks for well under a second per pair (about 0.1 s here; generous for shared CI).
    frames = [crossed_pair(20 + s, 20, 10, 60, 0.2, 0.3, 0.6, 0.4) for s in range(3)]
    start = time.process_time()
    for frame in frames:
        fit_frame(frame)
    assert (time.process_time() - start) / len(frames) < 0.75


# --------------------------------------------------------------------------- per pair

QUALITIES = {"a": 0.0, "b": 0.5, "c": 1.0}


@pytest.fixture(scope="module")
def study():
    return simulate_crossed(QUALITIES, 16, 8, 60, participant_sd=0.3, image_sd=0.2, seed=4)


def test_pair_table_is_tidy_and_consistent(study):
    table = glmm_pair_tests(study, alpha=0.05, sides_recorded=True)
    assert list(table.columns) == PAIR_TEST_COLUMNS
    assert table[["condition_a", "condition_b"]].values.tolist() == [
        ["a", "b"],
        ["a", "c"],
        ["b", "c"],
    ]
    assert table["reason"].eq("").all() and table["converged"].all()
    assert table["method"].str.startswith("GLMM REML-Laplace, Wald").all()
    np.testing.assert_allclose(table["p_holm"], holm_adjust(table["p"].to_numpy()))
    np.testing.assert_allclose(table["rate_low"], special.expit(table["ci_low"]))
    np.testing.assert_allclose(table["rate_a"], special.expit(table["log_odds"]))
    t_based = np.isfinite(table["df"])
    crit = np.where(t_based, stats.t.isf(0.025, table["df"].where(t_based, 1)), 1.959964)
    np.testing.assert_allclose(table["ci_high"] - table["log_odds"], crit * table["se"])
    ac = table.set_index(["condition_a", "condition_b"]).loc[("a", "c")]
    assert ac["log_odds"] < 0 and ac["rate_high"] < 0.5 and ac["p"] < 0.001  # c is better
    assert (table["n_votes"].sum(), table["n_participants"].max()) == (len(study), 16)
    # REML: SDs at least ML's (less downward bias), so the SE too; estimates agree
    ml = glmm_pair_tests(study, sides_recorded=True, test="ml")
    assert ml["method"].str.startswith("GLMM ML-Laplace").all()
    np.testing.assert_allclose(ml["log_odds"], table["log_odds_ml"])
    np.testing.assert_allclose(ml["se"], table["se_ml"])
    assert (table["se"] >= 0.97 * table["se_ml"]).all()
    assert ((table["log_odds"] - table["log_odds_ml"]).abs() < 0.1 * table["se"]).all()
    z = glmm_pair_tests(study, sides_recorded=True, test="ml-z")
    assert z["method"].eq("GLMM ML-Laplace, Wald z").all() and np.isinf(z["df"]).all()
    assert (z["p"] <= ml["p"] + 1e-12).all()  # t is never less conservative than z
    with pytest.raises(ValueError, match="test must be one of"):
        glmm_pair_tests(study, test="wald")


def test_pairs_too_large_for_the_dense_fit_get_the_cluster_robust_glm(study):
    from analysis.clustered import cluster_robust_glm

    table = glmm_pair_tests(study, max_levels=10)
    glm = cluster_robust_glm(study, sides_recorded=True)
    assert table["method"].str.startswith("cluster-robust GLM, two-way").all()
    assert table["reason"].str.contains("GLMM skipped: 24 participants \\+ images").all()
    np.testing.assert_allclose(table["p"], glm["p_value"])
    np.testing.assert_allclose(table["log_odds"], glm["log_odds"])


def test_pair_without_sides_fits_the_intercept_only(study):
    table = glmm_pair_tests(study, sides_recorded=False)
    assert table["side_log_odds"].isna().all() and table["p"].notna().all()


def test_degenerate_pairs_give_nan_and_a_reason_never_a_crash(study):
    votes = study.copy()
    ab = votes["condition_left"].isin(["a", "b"]) & votes["condition_right"].isin(["a", "b"])
    votes.loc[ab, "chosen_condition"] = "b"  # everyone always prefers b over a
    votes.loc[ab, "choice"] = np.where(votes.loc[ab, "condition_left"] == "b", "left", "right")
    table = glmm_pair_tests(votes).set_index(["condition_a", "condition_b"])
    assert np.isnan(table.loc[("a", "b"), "p"])
    assert table.loc[("a", "b"), "reason"].startswith("all votes one way")
    assert np.isfinite(table.loc[("a", "c"), "p"])
    # p_holm is over the pairs that were tested
    tested = table["p"].notna()
    assert table.loc[tested, "p_holm"].tolist() == pytest.approx(
        holm_adjust(table.loc[tested, "p"].to_numpy()).tolist()
    )

    one = study[study["participant"] == study["participant"].iloc[0]]
    single = glmm_pair_tests(one)
    assert single["p"].isna().all()
    assert single["reason"].str.startswith("fewer than 2 participants").all()

    one_image = study[study["image_id"] == study["image_id"].iloc[0]]
    reduced = glmm_pair_tests(one_image)
    assert reduced["reason"].str.contains("one image").all()
    assert reduced["sd_image"].isna().all() and reduced["p"].notna().all()

    lefty = study.copy()
    lefty["chosen_condition"] = lefty["condition_left"]  # pure position bias
    lefty["choice"] = "left"
    sided = glmm_pair_tests(lefty)
    assert sided["reason"].str.contains("side term left out").all()
    assert sided["side_log_odds"].isna().all() and (sided["log_odds"].abs() < 1).all()

    assert glmm_pair_tests(study.iloc[:0]).empty


# --------------------------------------------------------------------------- report


@pytest.fixture(scope="module")
def loaded_study(tmp_path_factory):
    return small_report_study(tmp_path_factory.mktemp("study"))


@pytest.mark.slow
def test_report_makes_the_glmm_the_primary_per_pair_test(loaded_study):
    from analysis.report import AnalysisOptions, render_html, run_analysis

    result = run_analysis(loaded_study, AnalysisOptions(n_boot=30))
    table = result.tables["pair_tests_glmm"]
    assert "mixed_model" not in result.tables
    assert len(table) == 3 and table["p"].notna().all()
    assert (
        "from the mixed-model test per pair (table pair_tests_glmm.csv), the primary test"
        in result.summary
    )
    assert "mixed-model test with participants and images random" in result.summary
    assert "p_Holm" not in result.summary and "Share of all votes" in result.summary
    assert "two-way test Holm-adjusted p " in result.summary
    ac = table.set_index(["condition_a", "condition_b"]).loc[("a", "c")]
    assert "a reliable preference" in result.summary and ac["p_holm"] < 0.05
    # the line for c over a quotes the GLMM's own interval (c is preferred: 1 - the a-rate)
    from analysis.report import _pct

    assert (f"CI {_pct(1 - ac['rate_high'])}–{_pct(1 - ac['rate_low'])}, Holm-adjusted p"
            in result.summary) or (
                f"CI {_pct(ac['rate_low'])}–{_pct(ac['rate_high'])}, Holm-adjusted p"
                in result.summary)
    assert any(n.startswith("The primary test, the mixed-model test per pair "
                            "(table pair_tests_glmm.csv): ") for n in result.notes)
    assert not {"cluster_glm", "cluster_bootstrap", "per_participant_tests"} & set(result.tables)
    html = render_html(result, {})
    assert html.index("Primary per-pair test") < html.index("Share of votes per pair")
    assert "* GLMM Holm p < 0.05" in result.figures["preference_matrix"].axes[0].get_title()

    fallback = run_analysis(loaded_study, AnalysisOptions(n_boot=30, mixed=False))
    assert "pair_tests_glmm" not in fallback.tables
    assert ("from the share of votes per pair (table pairs.csv) with its two-way "
            "cluster-robust interval and t test" in fallback.summary)
    assert "share of votes, two-way test with participants and images" in fallback.summary
    title = fallback.figures["preference_matrix"].axes[0].get_title()
    assert "* two-way test Holm p" in title


@pytest.mark.slow
def test_pwcmp_pairs_fit_without_sides():
    """The real pwcmp data (18 observers, 5 scenes, 7 tone mappers, no sides): every pair
    is fitted and the GLMM's direction agrees with the pooled rate."""
    from pathlib import Path

    from analysis.io import load_responses
    from analysis.pairs import preference_table

    loaded = load_responses(Path(__file__).parent / "data" / "pwcmp" / "ex3_tmo_cmp_data.csv")
    table = glmm_pair_tests(loaded.frame, sides_recorded=loaded.sides_recorded)
    assert len(table) == 21 and table["side_log_odds"].isna().all()
    fitted = table["p"].notna()
    assert fitted.sum() >= 19 and table.loc[fitted, "converged"].all()
    assert table.loc[~fitted, "reason"].str.len().gt(0).all()
    pooled = preference_table(loaded.frame).set_index(["condition_a", "condition_b"])
    rate = pooled.loc[list(zip(table["condition_a"], table["condition_b"], strict=True)), "rate_a"]
    clear = fitted.to_numpy() & (np.abs(rate.to_numpy() - 0.5) > 0.1)
    assert (np.sign(table["log_odds"][clear]) == np.sign(rate.to_numpy()[clear] - 0.5)).all()


# --------------------------------------------------------------------------- calibration


POWER_FLOOR = 0.6  # seen: 0.86 (80 pairs 1 JOD apart)


def _null_and_power_runs(n_datasets, qualities, n_participants, n_images, seed0):
    """p-values of glmm_pair_tests (the report's default test) over simulated studies:
    per-(participant, condition) SD 0.5 JOD and per-(image, condition) SD 0.4 JOD."""
    runs = []
    for d in range(n_datasets):
        votes = simulate_crossed(
            qualities,
            n_participants,
            n_images,
            60,
            participant_sd=0.5,
            image_sd=0.4,
            seed=seed0 + d,
        )
        table = glmm_pair_tests(votes, with_ml=False)  # the test, without the ML columns
        table["null"] = [
            qualities[a] == qualities[b]
            for a, b in zip(table["condition_a"], table["condition_b"], strict=True)
        ]
        table["dataset"] = d
        runs.append(table)
    return pd.concat(runs, ignore_index=True)


@pytest.mark.slow
def test_pair_test_holds_its_level_with_few_clusters_and_keeps_power():
    """Under the null with 10 participants and 5 images (5 equal conditions, 10 pairs,
    1,500 tests): rejection at .05 and .01 and the Holm family-wise error stay within
    nominal + 2 Monte Carlo SEs (seen: .035 / .013 / .067; the Wald z of the glmer fit
    gives about .087 / .019 / .12 in bench_glmm's few-both scenario, the old variational
    Bayes interval far more); and 1 JOD differences at 20 participants x 10 images are
    found (seen: 0.86). bench/bench_glmm.py measures the full picture (docs/analysis.md)."""
    equal = dict.fromkeys("abcde", 0.0)
    null = _null_and_power_runs(150, equal, 10, 5, 90_000)
    p = null["p"].to_numpy(dtype=float)
    assert np.isfinite(p).mean() > 0.99
    p = p[np.isfinite(p)]
    n = len(p)
    for alpha in (0.05, 0.01):
        rate = np.mean(p <= alpha)
        assert rate <= alpha + 2 * np.sqrt(alpha * (1 - alpha) / n), (alpha, rate)
    assert np.mean(p <= 0.05) >= 0.005  # not a test that never rejects
    fwe = null.groupby("dataset")["p_holm"].min().le(0.05).mean()
    assert fwe <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / 150), fwe

    power = _null_and_power_runs(20, {**equal, "e": 1.0}, 20, 10, 95_000)
    found = power.loc[~power["null"], "p"].le(0.05).mean()
    assert found >= POWER_FLOOR, found


@pytest.mark.slow
def test_bench_glmm_runs_and_prints_the_calibration_table(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    csv = tmp_path / "pairs.csv"
    done = subprocess.run(
        [
            sys.executable,
            "bench/bench_glmm.py",
            "--datasets",
            "1",
            "--scenarios",
            "few-none,few-power",
            "--reml",
            "--csv",
            str(csv),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| few-none | REML Wald t, Satterthwaite df >= G-1 (default) | 10 |" in done.stdout
    assert "power_0.05" in done.stdout and "CPU per pair fit" in done.stdout
    assert len(pd.read_csv(csv)) == 20


def test_a_runaway_random_effect_sd_gives_no_verdict():
    """With a handful of votes per participant the REML SDs can run off to 1e5-1e7
    (quasi-separation) and the log-odds with them; such a pair gets a reason instead of
    a p-value (before the guard: 'significant' log-odds of -8 from 5 votes)."""
    from analysis.glmm import MAX_SD, glmm_pair_tests
    from analysis.report import pair_table
    from analysis.simulation import simulate_responses

    runaway = []
    for seed in (1, 2, 8):
        main = simulate_responses(
            {"a": 0.0, "b": 0.3, "c": 0.6}, 5, 3, 4, observer_sd=1.0, image_sd=0.5, seed=seed
        )
        table = glmm_pair_tests(main, 0.05, True)
        tested = table[table["p"].notna()]
        assert (tested[["sd_participant", "sd_image"]].fillna(0) <= MAX_SD).all().all()
        runaway += [r for r in table["reason"] if "SD ran off" in r]
        pooled = pair_table(main).set_index(["condition_a", "condition_b"])["rate_a"]
        for row in tested[tested["p"] < 0.05].itertuples():  # no verdict against the votes
            assert (row.rate_a - 0.5) * (pooled[(row.condition_a, row.condition_b)] - 0.5) >= 0
    assert len(runaway) >= 3, runaway
