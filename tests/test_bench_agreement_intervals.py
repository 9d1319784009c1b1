"""The parts of ``bench/bench_agreement_intervals.py`` (alternative intervals for a
metric's 2AFC score) against independent computations: the report's rule against
``clustered.two_way_rate``, the moment estimator against lme4's REML fit, the
chi-square-model quantities against their closed forms in scipy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from tests.glmm_support import rscript_with_lme4
from tests.support import require_component

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    """bench/bench_agreement_intervals.py as a module (bench/ on sys.path, as the script
    puts it)."""
    if str(REPO / "bench") not in sys.path:
        sys.path.insert(0, str(REPO / "bench"))
    import bench_agreement_intervals

    return bench_agreement_intervals


def cell_sums(y, participant, image):
    """Cell sums and counts (participants x images) of ``y``."""
    S = np.zeros((participant.max() + 1, image.max() + 1))
    N = np.zeros_like(S)
    np.add.at(S, (participant, image), y)
    np.add.at(N, (participant, image), 1.0)
    return S, N


def test_report_rule_from_cell_sums_is_two_way_rate(bench):
    """The bench's report rule, computed from cell sums, gives two_way_rate's variance and
    df on 0/1 votes, both where the floor binds and where it does not."""
    from analysis.clustered import two_way_rate

    rng = np.random.default_rng(3)
    seen = set()
    for participant_sd in (0.0, 0.0, 0.0, 0.0, 1.2):
        participant = rng.integers(0, 15, 900)
        image = rng.integers(0, 8, 900)
        shift = rng.normal(0, participant_sd, 15)[participant]
        y = (rng.random(900) < 1 / (1 + np.exp(-shift))).astype(float)
        S, N = cell_sums(y, participant, image)
        parts = bench.one_way_parts(S, N)
        var, df = bench.report_rule(parts["v"], parts["g"])
        result = two_way_rate(y, participant, image)
        assert parts["rate"] == pytest.approx(result["rate"], rel=1e-12)
        assert var == pytest.approx(result["se"] ** 2, rel=1e-9)
        assert df == pytest.approx(result["df"], rel=1e-9)
        seen.add(var == parts["v"]["c"])
    assert seen == {True, False}  # floored in some, not in others


def test_chi_square_model_reduces_to_satterthwaite_and_student_t(bench):
    """Without a cell part the floored estimator is vp A + vi B: its df are Satterthwaite's
    closed form, the mixture quantile of A alone is Student's t (scipy), and the debiased
    floor gives back V and those df."""
    g = {"p": 20, "i": 10, "c": 200}
    v = {"p": 3.0, "i": 1.5, "c": 1e-12}
    expected = (3.0 + 1.5) ** 2 / (3.0**2 / 19 + 1.5**2 / 9)
    assert bench.floored_estimator_df(v, g) == pytest.approx(expected, rel=1e-6)
    alone = {"p": 2.0, "i": 1e-12, "c": 1e-12}
    assert bench.mixture_quantile(alone, g) == pytest.approx(stats.t.isf(0.025, 19), rel=1e-6)
    # the debiased floor: no bias left to remove far from the floor (V and Satterthwaite's
    # df back), and at the floor the cell part alone
    var, df = bench.debiased_floor({"p": 3.0, "i": 1.5, "c": 1e-6}, g)
    assert var == pytest.approx(4.5, rel=1e-3) and df == pytest.approx(expected, rel=1e-2)
    assert bench.debiased_floor({"p": 1.0, "i": 1.0, "c": 1.0}, g)[0] == 1.0


R_SCRIPT = r"""
suppressMessages(library(lme4))
d <- read.csv(commandArgs(trailingOnly = TRUE)[1])
d$participant <- factor(d$participant)
d$image <- factor(d$image)
fit <- lmer(y ~ 1 + (1 | participant) + (1 | image) + (1 | participant:image), data = d,
            REML = TRUE)
vc <- as.data.frame(VarCorr(fit))
for (g in c("participant", "image", "participant:image", "Residual"))
  cat(sprintf("%s,%.12g\n", g, vc$vcov[vc$grp == g]))
"""


def test_crossed_moments_equal_lmer_reml_on_balanced_data(bench, tmp_path):
    """Balanced crossed data with every component positive: the moment equations are the
    ANOVA ones, whose solution is REML's, so lme4's lmer (participant, image and
    participant:image intercepts) must give the same four variances."""
    require_component(
        rscript_with_lme4(),
        "R with lme4 (Rscript -e 'library(lme4)')",
        "apt-get install r-cran-lme4",
    )
    rng = np.random.default_rng(11)
    n_p, n_i, reps = 12, 8, 3
    participant = np.repeat(np.arange(n_p), n_i * reps)
    image = np.tile(np.repeat(np.arange(n_i), reps), n_p)
    y = (
        rng.normal(0, 1.0, n_p)[participant]
        + rng.normal(0, 0.8, n_i)[image]
        + rng.normal(0, 0.5, (n_p, n_i))[participant, image]
        + rng.normal(0, 1.0, len(participant))
    )
    S, N = cell_sums(y, participant, image)
    within = float(np.sum((y - (S / N)[participant, image]) ** 2))
    moments = bench.crossed_moments(S, N, within)
    assert np.all(moments["sigma2"] > 0)
    data = tmp_path / "crossed.csv"
    pd.DataFrame({"y": y, "participant": participant, "image": image}).to_csv(data, index=False)
    script = tmp_path / "lmer.R"
    script.write_text(R_SCRIPT)
    done = subprocess.run(
        ["Rscript", str(script), str(data)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    reml = dict(line.split(",") for line in done.stdout.strip().splitlines())
    expected = [float(reml[k]) for k in ("participant", "image", "participant:image", "Residual")]
    np.testing.assert_allclose(moments["sigma2"], expected, rtol=1e-4)
    # Var(mean) from the components: the closed form of a balanced design
    var = moments["w"] @ moments["sigma2"]
    s = moments["sigma2"]
    closed = s[0] / n_p + s[1] / n_i + s[2] / (n_p * n_i) + s[3] / len(y)
    assert var == pytest.approx(closed, rel=1e-12)
