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
    (export.ParticipantStats(n=10, n_left=5, n_catch=4, n_catch_correct=2), ExclusionRules(),
     ["catch_accuracy"]),
    (export.ParticipantStats(n=10, n_left=5, n_fast=3), ExclusionRules(), ["fast_responses"]),
    (export.ParticipantStats(n=10, n_left=10), ExclusionRules(), ["side_bias"]),
    (export.ParticipantStats(n=9, n_left=9), ExclusionRules(), []),  # too few for bias
    (export.ParticipantStats(n=10, n_left=5, n_repeat=2, n_repeat_consistent=0),
     ExclusionRules(min_repeat_consistency=0.5), ["repeat_consistency"]),
    (export.ParticipantStats(n=10, n_left=10, n_catch=2), ExclusionRules(
        min_catch_accuracy=None, max_side_bias=None, max_fast_fraction=None), []),
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
