"""Export (contract 2): CSV and Parquet equal the database rows, exclusion rules,
streaming in batches, read_responses, and the `pstudy export` command."""

from __future__ import annotations

import io
import json

import pandas as pd
import pyarrow.parquet as pq
import pytest
from sqlalchemy import select

from study_app import export
from study_app.extensions import db
from study_app.models import Trial, Vote
from study_app.studies import ExclusionRules
from tests.study_support import Participant, log_in_as_researcher, make_study, write_stimulus_set


@pytest.fixture
def finished_study(app, client, tmp_path):
    slug = make_study(app, write_stimulus_set(tmp_path / "set"), votes_per_item=4,
                      trials_per_participant=5, catch_trials=2, repeat_trials=1,
                      exclusion={"min_catch_accuracy": 0.75, "max_side_bias": 0.9,
                                 "min_trials_for_bias": 5})
    careful = Participant(client, slug, prolific_pid="careful")
    turns = iter(range(1000))

    def attentive(trial):  # picks the reference on catch trials, alternates otherwise
        if trial["reference_url"] in (trial["left_url"], trial["right_url"]):
            return "left" if trial["left_url"] == trial["reference_url"] else "right"
        return ("left", "right")[next(turns) % 2]

    careful.complete(attentive)
    careful.finish()
    lazy = Participant(client, slug, prolific_pid="lazy")
    lazy.complete(lambda trial: "left")
    log_in_as_researcher(app, client)
    Participant(client, slug, preview=True).complete()  # never exported
    return slug


def test_csv_and_parquet_hold_exactly_the_stored_votes(app, finished_study, tmp_path):
    with app.app_context(), db.engine.connect() as connection:
        buffer = io.StringIO()
        n_csv = export.write_csv(connection, finished_study, buffer, batch_rows=3)
        n_parquet = export.write_parquet(connection, finished_study, tmp_path / "r.parquet",
                                         batch_rows=3)
        stored = db.session.execute(
            select(Trial.token, Vote.choice, Vote.trial_index, Trial.kind)
            .join(Vote).where(Trial.preview.is_(False))).all()
    csv_frame = pd.read_csv(io.StringIO(buffer.getvalue()), keep_default_na=False)
    parquet_frame = pq.read_table(tmp_path / "r.parquet").to_pandas()
    assert n_csv == n_parquet == len(stored) == len(csv_frame) == len(parquet_frame)
    assert list(csv_frame.columns) == list(export.COLUMNS) == list(parquet_frame.columns)
    assert sorted(csv_frame["choice"]) == sorted(s.choice for s in stored)
    assert (csv_frame["choice"] == parquet_frame["choice"]).all()
    assert parquet_frame["rt_ms"].dtype == "float64"
    assert parquet_frame["reference_shown"].dtype == bool
    for frame in (csv_frame, parquet_frame):
        chosen = frame["chosen_condition"] == frame["condition_left"].where(
            frame["choice"] == "left", frame["condition_right"])
        assert chosen.all()
        assert set(frame["trial_kind"]) == {"main", "catch", "repeat"}
        catch = frame[frame["trial_kind"] == "catch"]
        assert (catch["expected_condition"] == "reference").all()
        for _, rows in frame.groupby("participant"):
            assert list(rows["trial_index"]) == list(range(len(rows)))
        assert frame["presented_at"].str.endswith("Z").all()
    assert (csv_frame.loc[csv_frame["trial_kind"] == "main", "expected_condition"] == "").all()
    assert parquet_frame.loc[parquet_frame["trial_kind"] == "main",
                             "expected_condition"].isna().all()
    meta = json.loads(pq.read_schema(tmp_path / "r.parquet").metadata[b"pstudy"])
    assert meta["study"] == finished_study and len(meta["study_config_sha256"]) == 64


def test_exclusions_flag_the_one_sided_participant(app, finished_study):
    frame = export.read_responses(app.config["SQLALCHEMY_DATABASE_URI"], finished_study)
    by_status = frame.groupby("participant")[["participant_status", "participant_excluded",
                                              "exclusion_reasons"]].first()
    assert len(by_status) == 2
    completed = by_status[by_status["participant_status"] == "completed"].iloc[0]
    started = by_status[by_status["participant_status"] == "started"].iloc[0]
    assert not completed["participant_excluded"] and completed["exclusion_reasons"] == ""
    assert started["participant_excluded"]
    assert "side_bias" in started["exclusion_reasons"].split(";")


@pytest.mark.parametrize(("stats", "rules", "expected"), [
    (export.ParticipantStats(n=10, n_main=10, n_main_left=5, n_catch=4, n_catch_correct=2),
     ExclusionRules(), ["catch_accuracy"]),
    (export.ParticipantStats(n=10, n_main=10, n_main_left=5, n_fast=3), ExclusionRules(),
     ["fast_responses"]),
    (export.ParticipantStats(n=10, n_main=10, n_main_left=10), ExclusionRules(), ["side_bias"]),
    (export.ParticipantStats(n=12, n_main=9, n_main_left=9), ExclusionRules(), []),  # too few
    (export.ParticipantStats(n=12, n_main=10, n_main_left=5), ExclusionRules(), []),  # main only
    (export.ParticipantStats(n=10, n_main=10, n_main_left=5, n_repeat=2, n_repeat_consistent=0),
     ExclusionRules(min_repeat_consistency=0.5), ["repeat_consistency"]),
    (export.ParticipantStats(n=10, n_main=10, n_main_left=10, n_catch=2), ExclusionRules(
        min_catch_accuracy=None, max_side_bias=None, max_fast_fraction=None), []),
    (export.ParticipantStats(n=4, n_main=4, n_main_left=2, status="returned"), ExclusionRules(),
     ["returned"]),  # withdrawn participants don't count by default
    (export.ParticipantStats(n=4, n_main=4, n_main_left=2, status="returned"),
     ExclusionRules(count_returned=True), []),
])
def test_exclusion_rules(stats, rules, expected):
    assert export.exclusion_reasons(stats, rules) == expected


def test_unknown_study_is_a_clear_error(app):
    with pytest.raises(export.ExportError, match="no study 'nope'"):
        export.read_responses(app.config["SQLALCHEMY_DATABASE_URI"], "nope")


def test_pstudy_export_writes_csv_parquet_and_provenance(app, finished_study, tmp_path):
    from click.testing import CliRunner

    from study_app.commands import export as export_command

    url = app.config["SQLALCHEMY_DATABASE_URI"]
    runner = CliRunner()
    result = runner.invoke(export_command, [finished_study, "-o", str(tmp_path / "r.csv"),
                                            "--database-url", url])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(tmp_path / "r.csv")
    provenance = json.loads((tmp_path / "r.csv.provenance.json").read_text())
    assert provenance["columns"] == list(export.COLUMNS)
    result = runner.invoke(export_command, [finished_study, "-o", str(tmp_path / "r.parquet"),
                                            "--database-url", url])
    assert result.exit_code == 0
    assert len(pd.read_parquet(tmp_path / "r.parquet")) == len(frame) > 0
    missing = runner.invoke(export_command, ["nope", "-o", str(tmp_path / "x.csv"),
                                             "--database-url", url])
    assert missing.exit_code == 1 and "no study 'nope'" in missing.output
    assert "Traceback" not in missing.output


@pytest.mark.parametrize("source", ["database", "parquet", "csv"])
def test_the_exports_rules_reproduce_the_dashboards_inclusion(app, client, tmp_path, source):
    """One rule set: the analysis, given only the export (its metadata carries the
    study's rules), excludes exactly the participants the dashboard excludes, for the
    same reasons; an analyst's override on the command line is the one thing that can
    change it."""
    from click.testing import CliRunner

    from analysis.io import load_responses
    from analysis.qc import apply_exclusions, qc_options_from_study
    from study_app.commands import export as export_command
    from study_app.researcher import dashboard_data
    from study_app.studies import find_study

    slug = make_study(app, write_stimulus_set(tmp_path / "set", n_images=6), votes_per_item=6,
                      trials_per_participant=10, catch_trials=2, repeat_trials=2,
                      exclusion={"min_catch_accuracy": 0.6, "max_side_bias": 0.85,
                                 "min_trials_for_bias": 8, "min_rt_ms": 250,
                                 "max_fast_fraction": 0.3, "min_repeat_consistency": None})
    turns = iter(range(10_000))

    def attentive(trial):
        if trial["reference_url"] in (trial["left_url"], trial["right_url"]):
            return "left" if trial["left_url"] == trial["reference_url"] else "right"
        return ("left", "right")[next(turns) % 2]

    def inattentive(trial):  # never the reference on catch trials
        if trial["reference_url"] in (trial["left_url"], trial["right_url"]):
            return "right" if trial["left_url"] == trial["reference_url"] else "left"
        return ("left", "right")[next(turns) % 2]

    behaviours = {"good": (attentive, {}), "one-sided": (lambda t: "left", {}),
                  "careless": (inattentive, {}), "hasty": (attentive, {"rt_ms": 120.0}),
                  "withdrawn": (attentive, {})}
    for name, (choose, overrides) in behaviours.items():
        participant = Participant(client, slug, prolific_pid=name)
        while True:
            body = participant.next().get_json()
            if body["done"]:
                break
            for trial in body["trials"]:
                assert participant.vote(trial["token"], choose(trial), **overrides
                                        ).status_code == 200
        participant.finish("returned" if name == "withdrawn" else "completed")
    with app.app_context():
        study = find_study(slug)
        dashboard = dashboard_data(study)
        flags = export.read_responses(app.config["SQLALCHEMY_DATABASE_URI"], slug)
    per_participant = flags.groupby("participant")[["participant_excluded",
                                                    "exclusion_reasons"]].first()
    dashboard_out = set(per_participant.index[per_participant["participant_excluded"]])
    assert dashboard["exclusions"]["excluded"] == len(dashboard_out) == 4  # all but "good"
    with app.app_context():
        from study_app.models import Participant as Row

        names = dict(db.session.execute(select(Row.public_id, Row.prolific_pid)).all())
    designed = {"one-sided": "side_bias", "careless": "catch_accuracy",
                "hasty": "fast_responses", "withdrawn": "returned"}
    for participant in dashboard_out:  # each broke (at least) the rule it was made to break
        assert designed[names[participant]] in per_participant.loc[
            participant, "exclusion_reasons"].split(";")

    if source == "database":
        loaded = load_responses(app.config["SQLALCHEMY_DATABASE_URI"], study=slug)
    else:
        out = tmp_path / f"responses.{source}"
        result = CliRunner().invoke(export_command, [slug, "-o", str(out), "--database-url",
                                                     app.config["SQLALCHEMY_DATABASE_URI"]])
        assert result.exit_code == 0, result.output
        loaded = load_responses(out)
    assert loaded.study_exclusion_rules["max_side_bias"] == 0.85
    options, sources = qc_options_from_study(loaded.study_exclusion_rules)
    assert sources["max_side_rate"] == "study" and not options.honour_study_exclusions
    qc = apply_exclusions(loaded.frame, options)
    table = qc.participants.set_index("participant")
    assert set(table.index[table["excluded"]]) == dashboard_out
    for participant in dashboard_out:  # the same reasons, by the same names
        assert set(table.loc[participant, "reasons"].split(";")) == set(
            per_participant.loc[participant, "exclusion_reasons"].split(";"))
    # an analyst who loosens one rule keeps that participant, and only that one
    looser, sources = qc_options_from_study(loaded.study_exclusion_rules,
                                            {"max_side_rate": None})
    kept = apply_exclusions(loaded.frame, looser).participants.set_index("participant")
    assert sources["max_side_rate"] == "command line"
    assert set(kept.index[kept["excluded"]]) == dashboard_out - set(
        per_participant.index[per_participant["exclusion_reasons"] == "side_bias"])
    assert kept.loc[[p for p in names if names[p] == "one-sided"][0], "excluded"] == (
        "catch_accuracy" in per_participant.loc[
            [p for p in names if names[p] == "one-sided"][0], "exclusion_reasons"])


def test_exposure_timing_is_exported_and_flagged_beyond_one_frame(app, client, tmp_path):
    """Three votes at 60 Hz asking 100 ms: shown 100 ms (ok), 116.7 ms = one frame over
    (ok), 133.3 ms = two frames over (flagged); a fourth vote has no timing (empty). The
    dashboard counts 2 of 3 within one frame."""
    slug = make_study(app, write_stimulus_set(tmp_path / "set"), votes_per_item=3,
                      trials_per_participant=6, exposure_ms=100)
    participant = Participant(client, slug)
    trials = participant.next().get_json()["trials"]
    period = 1000 / 60
    shown = {0: 6, 1: 7, 2: 8}  # frames actually shown per trial
    for index, frames in shown.items():
        onset = 1000.0 + 500 * index
        response = participant.vote(
            trials[index]["token"], exposure_requested_ms=100, frame_period_ms=period,
            exposure_frames_requested=6, exposure_onset_ms=onset,
            exposure_offset_ms=onset + frames * period, exposure_frames_measured=frames)
        assert response.status_code == 200, response.get_json()
    assert participant.vote(trials[3]["token"]).status_code == 200
    with app.app_context(), db.engine.connect() as connection:
        buffer = io.StringIO()
        export.write_csv(connection, slug, buffer)
        export.write_parquet(connection, slug, tmp_path / "r.parquet")
    csv_frame = pd.read_csv(io.StringIO(buffer.getvalue()), keep_default_na=False)
    assert list(csv_frame["exposure_ok"]) == ["true", "true", "false", ""]
    assert list(csv_frame["exposure_frames_measured"]) == ["6", "7", "8", ""]
    measured = csv_frame["exposure_measured_ms"][:3].astype(float)
    assert measured.tolist() == pytest.approx([100.0, 116.667, 133.333], abs=1e-3)
    parquet = pq.read_table(tmp_path / "r.parquet").to_pandas()
    assert parquet["exposure_ok"].tolist() == [True, True, False, None]
    assert parquet["frame_period_ms"][:3].tolist() == pytest.approx([period] * 3)
    assert parquet["exposure_requested_ms"].isna().tolist() == [False, False, False, True]
    # the dashboard's timing quality: 2 of the 3 frame-timed trials within one frame
    log_in_as_researcher(app, client)
    data = client.get(f"/researcher/studies/{slug}/dashboard.json").get_json()
    assert data["timing"] == {"timed": 3, "within_one_frame": 2, "share": pytest.approx(2 / 3)}
    page = client.get(f"/researcher/studies/{slug}").get_data(as_text=True)
    assert "66.7 % of 3 frame-timed trials within one frame of the requested 100 ms" in page
