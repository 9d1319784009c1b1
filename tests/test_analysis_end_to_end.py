"""`pstudy analyze` end to end: the real pwcmp dataset, a study database, stimuli metrics."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image
from scipy import stats

from analysis.io import load_responses
from analysis.metrics import metric_agreement, metric_distances, stimulus_table
from analysis.simulation import simulate_responses
from study_app.cli import main
from tests.study_support import Participant, make_study, write_stimulus_set

# A real pairwise-comparison dataset (pwcmp, MIT; licence beside it), kept in the repository
# so a clone anywhere runs the tests.
PWCMP = Path(__file__).resolve().parent / "data" / "pwcmp" / "ex3_tmo_cmp_data.csv"


@pytest.fixture(scope="module")
def pwcmp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pwcmp")
    result = CliRunner().invoke(
        main,
        ["analyze", str(PWCMP), "--out", str(out), "--no-mixed", "--n-boot", "150", "--quiet",
         "--no-pdf"],  # the PDF is tested in test_analysis_report.py
    )
    assert result.exit_code == 0, result.output
    return out


def _csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path)  # a plain CSV: the provenance is in its sidecar


@pytest.mark.slow
def test_pwcmp_scales_pass_sign_and_unit_sanity_checks(pwcmp_run):
    scale = _csv(pwcmp_run / "tables" / "scale_jod.csv").set_index("condition")
    bt = _csv(pwcmp_run / "tables" / "scale_bt.csv").set_index("condition")
    pairs = _csv(pwcmp_run / "tables" / "pairs.csv")
    raw = pd.read_csv(PWCMP)
    # sign: the scale orders conditions like their raw win rates
    chosen = np.where(raw["is_A_selected"] == 1, raw["condition_A"], raw["condition_B"])
    shown = pd.concat([raw["condition_A"], raw["condition_B"]]).value_counts()
    win_rate = pd.Series(chosen).value_counts().reindex(shown.index, fill_value=0) / shown
    rho = stats.spearmanr(scale.loc[win_rate.index, "estimate"], win_rate).statistic
    assert rho > 0.9
    assert scale["estimate"].idxmin() == win_rate.idxmin()
    # unit: scale differences agree with 1.4826 * probit(observed pair rate) (slope ~ 1)
    diff = np.array(
        [
            scale.loc[a, "estimate"] - scale.loc[b, "estimate"]
            for a, b in zip(pairs["condition_a"], pairs["condition_b"], strict=True)
        ]
    )
    rate = pairs["rate_a"].clip(0.02, 0.98)
    implied = 1.4826 * stats.norm.ppf(rate)
    slope = np.sum(diff * implied) / np.sum(implied**2)
    assert 0.6 < slope < 1.2, slope  # the weak prior shrinks a little, never inflates
    predicted = stats.norm.cdf(diff / 1.4826)
    assert np.average(np.abs(predicted - pairs["rate_a"]), weights=pairs["n"]) < 0.08
    # logits vs JOD: logistic(x) ~ Phi(x / 1.702), so BT / JOD ~ 1.702 / 1.4826 = 1.15
    ratio = np.polyfit(scale["estimate"], bt.loc[scale.index, "estimate"], 1)[0]
    assert 1.0 < ratio < 1.35, ratio
    assert (scale["ci_low"] <= scale["estimate"]).all() and (
        scale["estimate"] <= scale["ci_high"]
    ).all()
    participants = _csv(pwcmp_run / "tables" / "participants.csv")
    assert len(participants) == 18 and participants["outlier_score"].notna().all()
    assert (participants["outlier_score"] >= 1.5).sum() <= 3
    assert participants["excluded"].sum() == 0  # no catch trials, sides unknown: no rule fires


@pytest.mark.slow
def test_every_output_records_input_hash_and_options(pwcmp_run):
    digest = hashlib.sha256(PWCMP.read_bytes()).hexdigest()
    provenance = json.loads((pwcmp_run / "provenance.json").read_text())
    assert provenance["inputs"][0]["sha256"] == digest
    assert provenance["options"]["n_boot"] == 150 and provenance["options"]["mixed"] is False
    for rel, sha in provenance["outputs"].items():
        path = pwcmp_run / rel
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
        if path.suffix == ".csv":  # plain, with the provenance in a sidecar
            assert not path.read_text().startswith("#"), rel
            assert digest in Path(f"{path}.provenance.json").read_text(), rel
        elif path.suffix in (".tex", ".txt", ".html", ".json"):
            assert digest in path.read_text(), rel
        elif path.suffix == ".parquet":
            assert digest in pq.read_schema(path).metadata[b"pstudy_provenance"].decode()
        elif path.suffix == ".png":
            assert digest in Image.open(path).text["Description"]
    for name in ("pairs", "scale_jod", "significance_jod", "planning"):
        for suffix in ("csv", "parquet", "json", "tex"):
            assert (pwcmp_run / "tables" / f"{name}.{suffix}").is_file()
    html = (pwcmp_run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    assert "http://" not in html and "https://" not in html and "<link" not in html
    summary = (pwcmp_run / "summary.txt").read_text()
    assert "position bias was not assessed" in summary
    # the secondary outputs that miss their level in the calibration are not reported
    for name in ("cluster_glm", "cluster_bootstrap", "per_participant_tests"):
        assert not (pwcmp_run / "tables" / f"{name}.csv").exists()
    # each verdict quotes the interval of the test that gives it (--no-mixed: the two-way
    # test of the share of votes, table pairs)
    from analysis.report import _pct

    pairs = _csv(pwcmp_run / "tables" / "pairs.csv")
    assert not {"wilson_low", "cp_low"} & set(pairs.columns)
    tested = pairs[np.isfinite(pairs["p_holm"])].iloc[0]
    a_wins = tested["rate_a"] >= 0.5
    low, high = ((tested["ci_low"], tested["ci_high"]) if a_wins
                 else (1 - tested["ci_high"], 1 - tested["ci_low"]))
    win, lose = ((tested["condition_a"], tested["condition_b"]) if a_wins
                 else (tested["condition_b"], tested["condition_a"]))
    assert f"{win} over {lose}: share of votes, two-way test with participants and images" in summary
    assert f"CI {_pct(low)}–{_pct(high)}" in summary


def test_cli_errors_are_clean_messages(tmp_path):
    bad = tmp_path / "bad.csv"
    votes = simulate_responses({"a": 0, "b": 1}, 2, 2, 3, seed=0)
    votes.loc[1, "choice"] = "middle"
    votes.to_csv(bad, index=False)
    runner = CliRunner()
    result = runner.invoke(main, ["analyze", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "column 'choice' is not one of left, right at row 2 (file line 3)" in result.output
    good = tmp_path / "good.csv"
    simulate_responses({"a": 0, "b": 1}, 3, 2, 6, seed=0).to_csv(good, index=False)
    result = runner.invoke(
        main, ["analyze", str(good), "--out", str(tmp_path / "o"), "--anchor", "zz"]
    )
    assert result.exit_code == 2 and "'zz' is not a condition" in result.output
    result = runner.invoke(
        main, ["analyze", str(good), "--out", str(tmp_path / "o"), "--metric", "nope"]
    )
    assert result.exit_code == 2 and "unknown metric" in result.output


def _l1_distance(a: Path, b: Path) -> float:
    x = np.asarray(Image.open(a).convert("RGB"), dtype=float) / 255
    y = np.asarray(Image.open(b).convert("RGB"), dtype=float) / 255
    return float(np.abs(x - y).mean())


def test_metric_vs_human_agreement_on_a_stimulus_set(tmp_path):
    root = write_stimulus_set(
        tmp_path / "set", n_images=3, conditions=("l1", "l2", "ssim"), size=16
    )
    bare = write_stimulus_set(
        tmp_path / "bare", n_images=3, conditions=("l1", "l2", "ssim"), size=16, manifest=False
    )
    assert len(stimulus_table(root)) == len(stimulus_table(bare)) == 9
    distances, status = metric_distances(root, ["l1", "l2"])
    assert status["status"].eq("ok").all()
    l1 = distances[distances["metric"] == "l1"]
    for row in l1.itertuples():
        ref = root / "reference" / f"{row.image_id}.png"
        cand = root / row.condition / f"{row.image_id}.png"
        assert row.distance == pytest.approx(_l1_distance(cand, ref), rel=1e-5)
    # noise grows l1 < l2 < ssim in this set; humans here prefer the cleaner image 80 %
    votes = simulate_responses({"l1": 2.0, "l2": 1.0, "ssim": 0.0}, 10, 3, 30, seed=3, model="bt")
    votes["image_id"] = votes["image_id"].str.replace("img", "img00")
    table = metric_agreement(votes, distances).set_index("metric")
    # independent 2AFC score: per trial, did the human choose the metric's preferred image?
    lookup = l1.set_index(["image_id", "condition"])["distance"]
    d_left = lookup.loc[
        list(zip(votes["image_id"], votes["condition_left"], strict=True))
    ].to_numpy()
    d_right = lookup.loc[
        list(zip(votes["image_id"], votes["condition_right"], strict=True))
    ].to_numpy()
    predicted = np.where(d_left < d_right, votes["condition_left"], votes["condition_right"])
    assert table.loc["l1", "score_2afc"] == pytest.approx(
        (predicted == votes["chosen_condition"]).mean()
    )
    assert table.loc["l1", "score_2afc"] > 0.6
    assert table.loc["l1", "human_ceiling"] >= 0.5
    assert table.loc["l1", "n_trials"] == len(votes)


def test_metric_agreement_interval_counts_participants_and_images():
    """The 2AFC score's interval is the two-way interval of the per-vote agreement
    (participants and images random): checked against a per-vote agreement computed here
    and statsmodels' one-way cluster-robust variances of its mean, combined by hand
    (V_participants + V_images - V_cells, never below V_cells)."""
    import statsmodels.api as sm

    votes = simulate_responses(
        dict(zip("abcd", (0.0, 0.4, 0.8, 1.2), strict=True)),
        16,
        8,
        40,
        observer_sd=0.5,
        image_sd=0.4,
        seed=11,
    )
    rng = np.random.default_rng(5)
    images = sorted(votes["image_id"].unique())
    quality = {"a": 0.0, "b": 0.4, "c": 0.8, "d": 1.2}
    distances = pd.DataFrame(
        [
            {"metric": "m", "image_id": i, "condition": c, "distance": -q + rng.normal(0, 0.5)}
            for i in images
            for c, q in quality.items()
        ]
    )
    table = metric_agreement(votes, distances).set_index("metric")
    lookup = distances.set_index(["image_id", "condition"])["distance"]
    d_left = lookup.loc[list(zip(votes["image_id"], votes["condition_left"], strict=True))]
    d_right = lookup.loc[list(zip(votes["image_id"], votes["condition_right"], strict=True))]
    preferred = np.where(
        d_left.to_numpy() < d_right.to_numpy(), votes["condition_left"], votes["condition_right"]
    )
    agree = (preferred == votes["chosen_condition"]).to_numpy(dtype=float)
    assert table.loc["m", "score_2afc"] == pytest.approx(agree.mean())
    ones = np.ones((len(agree), 1))
    parts = {}
    cells = votes["participant"] + "|" + votes["image_id"]
    for name, groups in (("p", votes["participant"]), ("i", votes["image_id"]), ("c", cells)):
        codes = pd.factorize(groups)[0]
        fit = sm.OLS(agree, ones).fit(cov_type="cluster", cov_kwds={"groups": codes})
        n_groups = codes.max() + 1
        # statsmodels' factor G/(G-1) (n-1)/(n-k) is G/(G-1) with one parameter
        parts[name] = float(fit.cov_params()[0, 0])
        assert n_groups > 1
    var = max(parts["p"] + parts["i"] - parts["c"], parts["c"])
    spread = sum(
        v**2 / (g - 1)
        for v, g in (
            (parts["p"], votes["participant"].nunique()),
            (parts["i"], votes["image_id"].nunique()),
            (parts["c"], cells.nunique()),
        )
    )
    df = cells.nunique() - 1 if var == parts["c"] else var**2 / spread
    half = stats.t.isf(0.025, df) * np.sqrt(var)
    assert table.loc["m", "ci_low"] == pytest.approx(agree.mean() - half, rel=1e-9)
    assert table.loc["m", "ci_high"] == pytest.approx(agree.mean() + half, rel=1e-9)
    assert "two-way" in table.loc["m", "interval"]
    old = metric_agreement(votes, distances, n_boot=200, interval="images").set_index("metric")
    assert old.loc["m", "score_2afc"] == table.loc["m", "score_2afc"]
    assert "bootstrap over images" in old.loc["m", "interval"]
    with pytest.raises(ValueError, match="interval must be one of"):
        metric_agreement(votes, distances, interval="participants")


@pytest.mark.slow
def test_analyze_reads_a_study_database(app, tmp_path):
    set_root = write_stimulus_set(tmp_path / "set", n_images=4)
    make_study(app, set_root, slug="an", trials_per_participant=6)
    client = app.test_client()
    for _ in range(4):
        Participant(client, "an").complete(lambda trial: "left")
    url = app.config["SQLALCHEMY_DATABASE_URI"]
    from study_app.export import read_responses

    reference = read_responses(url, "an")
    loaded = load_responses(url, "an")
    assert len(loaded.frame) == len(reference) > 0 and loaded.input_format == "database"
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "analyze",
            url,
            "--study",
            "an",
            "--out",
            str(out),
            "--no-mixed",
            "--n-boot",
            "50",
            "--quiet",
            "--max-side-rate",
            "1.0",
            "--min-catch-accuracy",
            "0",
            "--ignore-study-exclusions",
            "--no-pdf",
        ],
    )
    assert result.exit_code == 0, result.output
    pairs = _csv(out / "tables" / "pairs.csv")
    main_rows = reference[reference["trial_kind"] == "main"]
    assert pairs["n"].sum() == len(main_rows)
    position = _csv(out / "tables" / "position_bias.csv")
    assert position.loc[0, "left_rate"] == 1.0  # everyone clicked left
