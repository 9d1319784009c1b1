"""Per-pair statistics against scipy/statsmodels references, and the preference matrix."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from scipy.stats import binomtest
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

from analysis import preference_table
from analysis.intervals import (
    bh_adjust,
    binomial_test_half,
    clopper_pearson_interval,
    cohens_h,
    holm_adjust,
    wilson_interval,
)
from analysis.plots import (
    figure_png,
    preference_matrix,
    preference_matrix_figure,
    scale_figure,
)
from analysis.simulation import simulate_responses

CASES = [(30, 40), (0, 7), (7, 7), (1, 1), (13, 25), (54, 100), (211, 400), (3, 50)]


@pytest.mark.parametrize(("k", "n"), CASES)
def test_intervals_and_binomial_test_match_statsmodels_and_scipy(k, n):
    for alpha in (0.05, 0.01):
        wl, wh = wilson_interval(k, n, alpha)
        ref = proportion_confint(k, n, alpha=alpha, method="wilson")
        assert np.allclose([wl, wh], ref, atol=1e-12)
        cl, ch = clopper_pearson_interval(k, n, alpha)
        ref = proportion_confint(k, n, alpha=alpha, method="beta")
        assert np.allclose([cl, ch], ref, atol=1e-10)
    assert binomial_test_half(k, n) == pytest.approx(binomtest(k, n, 0.5).pvalue, rel=1e-10)


def test_design_note_binomial_example():
    """analysis.md: 30 of 40 -> p = 0.00222, CP [0.5880, 0.8731], Wilson [0.5981, 0.8581]."""
    assert binomial_test_half(30, 40) == pytest.approx(0.00222, abs=5e-6)
    assert np.allclose(clopper_pearson_interval(30, 40), [0.5880, 0.8731], atol=5e-5)
    assert np.allclose(wilson_interval(30, 40), [0.5981, 0.8581], atol=5e-5)


def test_adjustments_match_multipletests_with_explicit_methods():
    rng = np.random.default_rng(3)
    for size in (1, 2, 5, 21, 60):
        p = np.concatenate([rng.uniform(0, 0.05, size // 2), rng.uniform(0, 1, size - size // 2)])
        p[0] = p[-1] if size > 1 else p[0]  # a tie
        assert np.allclose(holm_adjust(p), multipletests(p, method="holm")[1])
        assert np.allclose(bh_adjust(p), multipletests(p, method="fdr_bh")[1])
    with_nan = np.array([0.01, np.nan, 0.04])
    assert np.isnan(holm_adjust(with_nan)[1])
    assert np.allclose(holm_adjust(with_nan)[[0, 2]], multipletests([0.01, 0.04], method="holm")[1])


def test_cohens_h_sign_and_size():
    assert cohens_h(0.5) == 0
    assert cohens_h(0.75) == pytest.approx(2 * np.arcsin(np.sqrt(0.75)) - np.pi / 2)
    assert cohens_h(0.25) == pytest.approx(-cohens_h(0.75))


def _votes(rows):
    return pd.DataFrame(
        rows, columns=["trial_kind", "condition_left", "condition_right", "chosen_condition"]
    )


def test_preference_table_counts_orders_pairs_and_ignores_catch_trials():
    rows = (
        [("main", "l2", "msssim", "msssim")] * 7
        + [("main", "msssim", "l2", "msssim")] * 5
        + [("main", "l2", "msssim", "l2")] * 3
        + [("main", "ssim", "l2", "ssim")] * 4
        + [("catch", "reference", "catch-degraded", "reference")] * 9
        + [("repeat", "l2", "msssim", "l2")] * 2
    )
    table = preference_table(_votes(rows))
    assert list(table[["condition_a", "condition_b"]].itertuples(index=False, name=None)) == [
        ("l2", "msssim"),
        ("l2", "ssim"),
    ]
    first = table.iloc[0]
    assert (first.n, first.wins_a) == (15, 3)
    assert first.rate_a == pytest.approx(0.2)
    assert first.p_value == pytest.approx(binomtest(3, 15).pvalue)
    assert first.cohens_h < 0
    assert first.wilson_low < 0.2 < first.wilson_high
    p = table["p_value"].to_numpy()
    assert np.allclose(table["p_holm"], multipletests(p, method="holm")[1])
    assert np.allclose(table["p_bh"], multipletests(p, method="fdr_bh")[1])
    for column in [
        "condition_a",
        "condition_b",
        "n",
        "wins_a",
        "rate_a",
        "wilson_low",
        "wilson_high",
        "p_value",
        "p_holm",
    ]:
        assert column in table.columns


def test_preference_table_rejects_missing_columns_and_bad_alpha():
    with pytest.raises(ValueError, match="chosen_condition"):
        preference_table(pd.DataFrame({"condition_left": ["a"], "condition_right": ["b"]}))
    with pytest.raises(ValueError, match="alpha"):
        preference_table(_votes([("main", "a", "b", "a")]), alpha=1.5)


def test_preference_table_empty_input_gives_empty_table():
    table = preference_table(_votes([("catch", "reference", "x", "reference")]))
    assert table.empty and "p_holm" in table.columns


def test_preference_matrix_is_antisymmetric_and_figure_renders():
    responses = simulate_responses({"a": 0.0, "b": 1.0, "c": 2.0}, 10, 5, 30, seed=1)
    table = preference_table(responses)
    names, rate, low, high = preference_matrix(table)
    assert names == ["a", "b", "c"]
    off = ~np.eye(3, dtype=bool)
    assert np.allclose(rate[off] + rate.T[off], 1.0)
    assert np.all(low[off] <= rate[off]) and np.all(rate[off] <= high[off])
    assert rate[2, 0] > 0.5  # c is the better condition
    fig = preference_matrix_figure(table)
    assert isinstance(fig, Figure)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert len(texts) == 6 and any("*" in t for t in texts)
    assert "[Wilson interval]" in fig.axes[0].get_title()
    assert figure_png(fig).startswith(b"\x89PNG")
    # the report's table brings its own (two-way) bounds, and the title names them
    from analysis.clustered import two_way_rate_tests

    two_way = two_way_rate_tests(responses)
    title = preference_matrix_figure(two_way).axes[0].get_title()
    assert "[two-way interval]" in title and "Wilson" not in title


def test_preference_matrix_figure_of_an_empty_table_says_so_without_warnings():
    import warnings

    empty = preference_table(simulate_responses({"a": 0.0, "b": 1.0}, 2, 2, 4).iloc[:0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = preference_matrix_figure(empty)
        assert [t.get_text() for t in fig.axes[0].texts] == ["no votes yet"]
        assert figure_png(fig).startswith(b"\x89PNG")


def test_scale_figure_draws_intervals_that_exclude_their_estimate():
    # A percentile bootstrap interval of a tiny study can miss the point estimate, and a
    # condition can lack an interval; the figure shows both as they are.
    scale = pd.DataFrame({
        "condition": ["l1", "l2", "ssim"],
        "estimate": [0.3, -0.3, 0.0],
        "ci_low": [0.35, -0.9, np.nan],
        "ci_high": [0.8, -0.1, np.nan],
    })
    fig = scale_figure(scale)
    (intervals,) = fig.axes[0].collections
    segments = sorted(tuple(map(tuple, s)) for s in intervals.get_segments())
    assert ((-0.9, 0.0), (-0.1, 0.0)) in segments and ((0.35, 2.0), (0.8, 2.0)) in segments
    assert figure_png(fig).startswith(b"\x89PNG")
