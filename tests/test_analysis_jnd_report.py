"""`pstudy analyze` on a JND study run through the real API: the report shows the JND
tables (shares of "different" against the export counted independently, the
psychometric fit at the given levels, each metric's average precision) and the exposure
accuracy of the frame-timed sequential trials; no 2AFC pairs or scales."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from study_app.cli import main
from tests.study_support import Participant, make_study, write_stimulus_set
from tests.test_study_jnd import SEQUENCE

LEVELS = {"l1": 1, "l2": 2, "ssim": 3}  # write_stimulus_set's noise grows with the level


def test_pstudy_analyze_reports_a_jnd_study_with_its_tables_and_exposure_timing(app, tmp_path):
    root = write_stimulus_set(tmp_path / "set", n_images=3)
    slug = make_study(
        app, root, slug="jnd", task="jnd", votes_per_item=6, trials_per_participant=9,
        catch_trials=1, repeat_trials=0, practice_trials=0,
    )  # fmt: skip
    client = app.test_client()
    rng = np.random.default_rng(5)
    late = {**SEQUENCE, "second_onset_ms": 1800.0, "second_offset_ms": 2300.0}  # ISI 300 ms
    for person in range(6):
        participant = Participant(client, slug)
        while not (batch := participant.next().get_json())["done"]:
            for trial in batch["trials"]:
                same_image = trial["left_url"] == trial["right_url"]
                answer = "same" if same_image or rng.random() < 0.5 else "different"
                timing = late if person == 0 else SEQUENCE
                assert participant.vote(trial["token"], answer, **timing).status_code == 200
    url = app.config["SQLALCHEMY_DATABASE_URI"]
    out = tmp_path / "out"
    levels = ",".join(f"{k}={v}" for k, v in LEVELS.items())
    result = CliRunner().invoke(
        main,
        ["analyze", url, "--study", slug, "--out", str(out), "--quiet", "--no-pdf",
         "--jnd-levels", levels, "--stimuli", str(root), "--metric", "l2", "--metric", "ssim"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    tables = out / "tables"
    from study_app.export import read_responses

    export = read_responses(url, slug)
    kept = export[~export["participant_excluded"]]
    condition = np.where(
        kept["condition_left"] == "reference", kept["condition_right"], kept["condition_left"]
    )
    expected = (kept["jnd_answer"] == "different").groupby(condition).agg(["sum", "size"])
    rates = pd.read_csv(tables / "jnd_rates.csv").set_index("condition")
    expected = expected.rename(index={"reference": "reference (identical pair)"})
    assert rates["n"].to_dict() == expected["size"].to_dict()
    assert rates["n_different"].to_dict() == expected["sum"].to_dict()
    assert rates.loc["reference (identical pair)", "rate_different"] == 0.0
    assert set(pd.read_csv(tables / "jnd_levels.csv")["level"]) == {1.0, 2.0, 3.0}
    assert pd.read_csv(tables / "jnd_psychometric.csv")["n_levels"].tolist() == [3]
    ap = pd.read_csv(tables / "jnd_metric_ap.csv")
    assert set(ap["metric"]) == {"l2", "ssim"} and ap["average_precision"].between(0, 1).all()
    timing = pd.read_csv(tables / "exposure_accuracy.csv").set_index("phase")
    assert timing.index.tolist() == ["first image", "interval", "second image"]
    late_share = (export["isi_measured_ms"] == 300.0).mean()  # the first participant's
    assert 0 < late_share < 1
    assert timing.loc["interval", "within_one_frame"] == 1 - late_share
    assert timing.loc["first image", "within_one_frame"] == 1.0
    assert not (tables / "pairs.csv").exists()
    html = (out / "report.html").read_text()
    for heading in ("Same or different (JND)", "Exposure timing", "Participants and quality"):
        assert heading in html
    assert "Pairwise results" not in html and "Scales" not in html
    assert "Metric agreement" not in html  # the metrics' status is in the JND section
    assert set(pd.read_csv(tables / "jnd_metric_status.csv")["metric"]) == {"l2", "ssim"}
    assert "same/different (just-noticeable difference, JND) task" in html


def test_a_limited_exposure_2afc_report_has_the_exposure_accuracy_section(app, tmp_path):
    from analysis.io import load_responses
    from analysis.qc import QCOptions
    from analysis.report import AnalysisOptions, run_analysis
    from analysis.report_html import render_html

    root = write_stimulus_set(tmp_path / "set", n_images=4)
    slug = make_study(app, root, slug="timed", exposure_ms=100, practice_trials=0)
    client = app.test_client()
    timing = {key: SEQUENCE[key] for key in list(SEQUENCE)[:6]}
    timing.update(exposure_requested_ms=100, exposure_frames_requested=6)
    measured = [100.0, 100.0, 133.4]  # the third misses by two frames
    for person in range(3):
        participant = Participant(client, slug)
        while not (batch := participant.next().get_json())["done"]:
            for k, trial in enumerate(batch["trials"]):
                offset = timing["exposure_onset_ms"] + measured[person]
                response = participant.vote(
                    trial["token"],
                    "left" if k % 2 else "right",
                    **{**timing, "exposure_offset_ms": offset},
                )
                assert response.status_code == 200
    loaded = load_responses(app.config["SQLALCHEMY_DATABASE_URI"], slug)
    options = AnalysisOptions(
        mixed=False, n_boot=20, qc=QCOptions(min_catch_accuracy=None, honour_study_exclusions=False)
    )
    result = run_analysis(loaded, options)
    table = result.tables["exposure_accuracy"]
    assert table[["phase", "requested_ms"]].values.tolist() == [["exposure", 100.0]]
    assert table["n"].tolist() == [len(loaded.frame)]
    assert table["within_one_frame"].iloc[0] == pytest.approx(
        (loaded.frame["exposure_measured_ms"] == 100.0).mean()
    )
    assert table["measured_max_ms"].iloc[0] == pytest.approx(133.4)
    html = render_html(result, {})
    assert "Exposure timing" in html and "Pairwise results" in html
