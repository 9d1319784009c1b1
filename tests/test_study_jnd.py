"""Sequential presentation and the JND task on the server: the settings and their errors,
JND trials (each condition against its reference, the reference twice as catch trials),
answers stored exactly once on SQLite and PostgreSQL (both vote fast paths), malformed
answers refused with nothing changed, and the export's task / jnd_answer / sequential
timing columns."""

from __future__ import annotations

import io
import re

import pytest
from sqlalchemy import func, select, update

from study_app.studies import StudyConfigError, parse_config
from tests.study_support import Participant, make_study, write_stimulus_set

BASE = {"title": "T", "slug": "tt"}
SEQUENCE = {  # a sequential trial's timing as the page sends it (60 Hz)
    "exposure_requested_ms": 500, "frame_period_ms": 16.667, "exposure_frames_requested": 30,
    "exposure_onset_ms": 1000.0, "exposure_offset_ms": 1500.0, "exposure_frames_measured": 30,
    "isi_requested_ms": 250, "second_requested_ms": 500, "second_frames_requested": 30,
    "second_onset_ms": 1766.7, "second_offset_ms": 2266.7, "second_frames_measured": 30,
}  # fmt: skip


@pytest.mark.parametrize(("settings", "message"), [
    ({"task": "abx"}, "'task' must be one of ['2afc', 'jnd']"),
    ({"presentation": "stacked"}, "'presentation' must be one of"),
    ({"presentation": "sequential", "first_ms": 0}, "'first_ms' must be an integer"),
    ({"presentation": "sequential", "isi_ms": -1}, "'isi_ms' must be an integer"),
    ({"presentation": "sequential", "second_ms": 20_000}, "'second_ms' must be an integer"),
    ({"presentation": "sequential", "isi_mask": "pink"}, "'isi_mask' must be one of"),
    ({"presentation": "sequential", "exposure_ms": 200}, "set exposure_ms: null"),
    ({"task": "jnd", "presentation": "side-by-side"}, "use presentation: sequential"),
    ({"task": "jnd", "question_mode": "reference"}, "use question_mode: no-reference"),
    ({"task": "jnd", "pairs": [["l1", "l2"]]}, "leave 'pairs' out"),
    ({"task": "jnd", "design": "active"}, "needs design: balanced"),
])  # fmt: skip
def test_bad_task_and_presentation_settings_name_the_problem(settings, message):
    with pytest.raises(StudyConfigError, match=re.escape(message)):
        parse_config({**BASE, **settings})


def test_a_jnd_study_defaults_to_sequential_without_a_reference_and_asks_same_or_different():
    config = parse_config({**BASE, "task": "jnd"})
    assert (config.presentation, config.question_mode, config.reference_shown) == (
        "sequential",
        "no-reference",
        False,
    )
    assert config.question_text == "Were the two images the same or different?"
    sequential = parse_config({**BASE, "presentation": "sequential"})
    assert sequential.question_text == (
        "Which image was closer to the reference: the first or the second?"
    )


def test_the_cli_creates_a_jnd_study_and_refuses_bad_settings_with_a_message(tmp_path):
    from click.testing import CliRunner

    from study_app.commands import study

    url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    root = write_stimulus_set(tmp_path / "set")
    runner = CliRunner()
    bad = runner.invoke(
        study,
        [
            "create",
            str(root),
            "--task",
            "jnd",
            "--presentation",
            "side-by-side",
            "--database-url",
            url,
        ],
    )
    assert bad.exit_code == 1 and "use presentation: sequential" in bad.output
    assert "Traceback" not in bad.output
    good = runner.invoke(
        study,
        [
            "create",
            str(root),
            "--task",
            "jnd",
            "--slug",
            "jnd",
            "--first-ms",
            "1000",
            "--isi-ms",
            "250",
            "--isi-mask",
            "noise",
            "--database-url",
            url,
        ],
    )
    assert good.exit_code == 0, good.output
    assert "design: 12 items" in good.output  # 4 images x 3 conditions, each vs reference
    import json
    import sqlite3

    with sqlite3.connect(tmp_path / "cli.sqlite3") as connection:
        config = json.loads(connection.execute("SELECT config FROM study").fetchone()[0])
    assert (
        config["task"],
        config["presentation"],
        config["first_ms"],
        config["isi_ms"],
        config["second_ms"],
        config["isi_mask"],
    ) == ("jnd", "sequential", 1000, 250, 500, "noise")


def _jnd_study(app, tmp_path, **config):
    settings = {
        "task": "jnd",
        "votes_per_item": 1,
        "trials_per_participant": 6,
        "catch_trials": 2,
        "repeat_trials": 1,
        "practice_trials": 0,
        "exclusion": {"min_catch_accuracy": 1.0},
        **config,
    }
    return make_study(app, write_stimulus_set(tmp_path / "set", n_images=2), **settings)


def test_jnd_trials_pair_each_condition_with_its_reference_and_answers_are_stored_once(
    db_app, tmp_path
):
    """On SQLite and PostgreSQL: main trials show a reference and a reconstruction (the
    reference first about half of the time), catch trials the reference twice; each answer
    is stored once, replays answer the same, a changed answer is a conflict."""
    from study_app.export import write_csv
    from study_app.extensions import db
    from study_app.models import Trial, Vote

    slug = _jnd_study(db_app, tmp_path)
    client = db_app.test_client()
    study = client.get(f"/api/v1/studies/{slug}").get_json()["study"]
    assert study["task"] == "jnd" and study["display"]["presentation"] == "sequential"
    assert study["display"]["sequence"] == {
        "first_ms": 500,
        "isi_ms": 500,
        "second_ms": 500,
        "isi_mask": "grey",
    }
    person = Participant(client, slug)
    # Each fresh item's order is drawn from the participant's seeded stream, which starts
    # from its random public id: fixed here, so the order is the same on every run (a
    # random id gave all six main trials one order in about 3 % of runs).
    from study_app.models import Participant as ParticipantRow

    with db_app.app_context():
        db.session.execute(update(ParticipantRow).values(public_id="p-jnd-order"))
        db.session.commit()
    answers = {}
    while not (batch := person.next().get_json())["done"]:
        for trial in batch["trials"]:
            assert trial["reference_url"] is None  # no separate reference in a JND trial
            answer = "same" if trial["left_url"] == trial["right_url"] else "different"
            response = person.vote(trial["token"], answer)
            assert response.status_code == 200, response.get_json()
            answers[trial["token"]] = answer
    first = next(iter(answers))
    replay = person.vote(first, answers[first])
    assert replay.status_code == 200 and replay.headers["X-Idempotent-Replay"] == "true"
    other = "same" if answers[first] == "different" else "different"
    assert person.vote(first, other).status_code == 409
    assert person.finish().status_code == 200

    with db_app.app_context():
        rows = db.session.execute(
            select(
                Trial.kind,
                Trial.condition_left,
                Trial.condition_right,
                Trial.expected_condition,
                Vote.choice,
                Vote.chosen_condition,
            ).join(Vote, Vote.trial_id == Trial.id)
        ).all()
        assert db.session.scalar(select(func.count(Vote.id))) == len(answers) == 9
        buffer = io.StringIO()
        with db.engine.connect() as connection:
            write_csv(connection, slug, buffer)
    kinds = [r.kind for r in rows]
    assert (kinds.count("main"), kinds.count("catch"), kinds.count("repeat")) == (6, 2, 1)
    for row in rows:
        shown = {row.condition_left, row.condition_right}
        if row.kind == "catch":
            assert shown == {"reference"} and row.expected_condition == "same"
        else:
            assert "reference" in shown and len(shown) == 2  # one condition vs its reference
        assert row.chosen_condition == row.choice  # a JND vote keeps its answer there
    main = [r for r in rows if r.kind == "main"]
    assert {r.condition_left == "reference" for r in main} == {True, False}  # both orders
    assert all(r.choice == "same" for r in rows if r.kind == "catch")

    import pandas as pd

    export = pd.read_csv(io.StringIO(buffer.getvalue()), keep_default_na=False)
    assert set(export["task"]) == {"jnd"}
    assert set(export["choice"]) == {""}  # no side in a JND answer
    assert sorted(export["jnd_answer"]) == sorted(answers.values())
    # the catch trials were all answered "same": nobody excluded (no side bias either)
    assert set(export["participant_excluded"]) == {False}


def test_malformed_or_mismatched_answers_are_refused_and_change_nothing(db_app, tmp_path):
    from study_app.extensions import db
    from study_app.models import Participant as ParticipantRow
    from study_app.models import Trial, Vote

    jnd = _jnd_study(db_app, tmp_path)
    two_afc = make_study(
        db_app,
        write_stimulus_set(tmp_path / "other", n_images=2),
        slug="two",
        presentation="sequential",
        practice_trials=0,
    )
    client = db_app.test_client()
    person = Participant(client, jnd)
    token = person.next().get_json()["trials"][0]["token"]
    base = {"trial_token": token}
    cases = [
        ({"choice": "left"}, "this is a jnd study"),  # a 2afc answer to a JND trial
        ({"choice": "maybe"}, "'choice' must be"),
        (
            {"choice": "same", **{k: SEQUENCE[k] for k in list(SEQUENCE)[:8]}},
            "the sequential timing fields",
        ),  # half the sequential fields
        (
            {
                "choice": "same",
                **{
                    k: v
                    for k, v in SEQUENCE.items()
                    if not k.startswith("exposure") and k != "frame_period_ms"
                },
            },
            "need the exposure timing fields",
        ),
        ({"choice": "same", **SEQUENCE, "second_onset_ms": 1400.0}, "'second_onset_ms'"),
        ({"choice": "same", **SEQUENCE, "second_offset_ms": 1700.0}, "'second_offset_ms'"),
        ({"choice": "same", **SEQUENCE, "isi_requested_ms": -5}, "'isi_requested_ms'"),
    ]
    for overrides, message in cases:
        response = person.vote(token, **{**base, **overrides})
        assert response.status_code == 400, (overrides, response.get_json())
        assert message in response.get_json()["error"], response.get_json()
    other = Participant(client, two_afc)
    two_token = other.next().get_json()["trials"][0]["token"]
    refused = other.vote(two_token, "same")
    assert refused.status_code == 400 and "this is a 2afc study" in refused.get_json()["error"]
    with db_app.app_context():
        assert db.session.scalar(select(func.count(Vote.id))) == 0
        assert set(db.session.scalars(select(Trial.status))) == {"leased"}
        assert set(db.session.scalars(select(ParticipantRow.n_answered))) == {0}
    # the same trials then take well-formed answers, with the sequential timing
    assert person.vote(token, "different", **SEQUENCE).status_code == 200
    assert other.vote(two_token, "right", **SEQUENCE).status_code == 200


def test_sequential_timing_is_stored_and_exported_with_its_measured_interval(app, tmp_path):
    from study_app.export import read_responses

    slug = make_study(
        app,
        write_stimulus_set(tmp_path / "set", n_images=2),
        presentation="sequential",
        isi_ms=250,
        practice_trials=0,
    )
    client = app.test_client()
    person = Participant(client, slug)
    trials = person.next().get_json()["trials"]
    late = {**SEQUENCE, "second_onset_ms": 1800.0, "second_offset_ms": 2300.0}  # ISI 300 ms
    assert person.vote(trials[0]["token"], "left", **SEQUENCE).status_code == 200
    assert person.vote(trials[1]["token"], "right", **late).status_code == 200
    assert person.vote(trials[2]["token"], "right").status_code == 200  # no timing sent
    frame = read_responses(app.config["SQLALCHEMY_DATABASE_URI"], slug)
    assert list(frame["task"]) == ["2afc"] * 3
    assert frame["jnd_answer"].isna().all()
    assert list(frame["choice"]) == ["left", "right", "right"]  # first / second
    assert frame["isi_measured_ms"].tolist()[:2] == [266.7, 300.0]
    assert frame["second_measured_ms"].tolist()[:2] == [500.0, 500.0]
    # 266.7 ms for 250 is within one frame (16.667 + 0.5 ms); 300 ms is not
    assert frame["exposure_ok"].tolist() == [True, False, None]
    assert frame["second_frames_requested"].tolist()[:2] == [30.0, 30.0]


def test_the_new_study_form_creates_a_jnd_study_and_names_a_bad_duration(app, client, tmp_path):
    """The form: a JND study with its sequence (always sequential, whatever the
    presentation field says), a bad interval refused with the field's message and nothing
    created, and the dashboard's timing line for a sequential study."""
    from study_app.extensions import db
    from study_app.models import Item, Study
    from tests.test_pages import study_form
    from tests.test_pages_support import import_set, login, make_researcher
    from tests.test_pages_support import write_stimulus_set as write_set

    import_set(app, write_set(tmp_path / "set"), owner=make_researcher(app))
    login(client)
    page = client.get("/researcher/studies/new?set=1").get_data(as_text=True)
    assert 'name="task"' in page and 'name="isi_mask"' in page
    settings = {"task": "jnd", "first_ms": "200", "isi_ms": "100", "second_ms": "200",
                "isi_mask": "noise", "conditions": ["blurred"]}  # fmt: skip
    bad = client.post("/researcher/studies/new?set=1",
                      data=study_form(page, **{**settings, "isi_ms": "-5"}))  # fmt: skip
    assert bad.status_code == 400
    assert "Number must be between 0 and 10000" in bad.get_data(as_text=True)
    created = client.post("/researcher/studies/new?set=1", data=study_form(page, **settings))
    assert created.status_code == 303, created.get_data(as_text=True)[:2000]
    with app.app_context():
        study = db.session.scalars(select(Study).where(Study.slug == "loss-cmp")).one()
        assert {
            k: study.config[k]
            for k in (
                "task",
                "presentation",
                "question_mode",
                "first_ms",
                "isi_ms",
                "second_ms",
                "isi_mask",
            )
        } == {
            "task": "jnd",
            "presentation": "sequential",
            "question_mode": "no-reference",
            "first_ms": 200,
            "isi_ms": 100,
            "second_ms": 200,
            "isi_mask": "noise",
        }
        items = db.session.scalars(select(Item).where(Item.study_id == study.id)).all()
        assert len(items) == 4 and all(i.condition_a_id == i.condition_b_id for i in items)
    dashboard = client.get("/researcher/studies/loss-cmp").get_data(as_text=True)
    assert 'data-exposure-ms="200 / 100 / 200"' in dashboard
    assert "Exposure timing: no frame-timed trials yet." in dashboard


def test_simulated_participants_answer_a_jnd_study_by_the_images_difference(
    app, live_server, tmp_path
):
    """The metric observer answers "different" when the two images differ by more than
    JND_RMSE: write_stimulus_set's noise grows with the condition (l1 < JND_RMSE < ssim),
    so l1 is mostly "same", ssim always "different", the reference twice "same"."""
    from study_app.export import read_responses
    from study_app.simulate import run_simulation

    slug = _jnd_study(app, tmp_path, votes_per_item=4)
    result = run_simulation(live_server, slug, participants=4, concurrency=2,
                            observer="metric", noise=0.002, progress=False)  # fmt: skip
    assert result.errors == [] and result.completed == 4
    export = read_responses(app.config["SQLALCHEMY_DATABASE_URI"], slug)
    assert len(export) == len(result.votes)
    shown = export["condition_left"].where(
        export["condition_left"] != "reference", export["condition_right"]
    )
    different = (export["jnd_answer"] == "different").groupby(shown).mean()
    assert different["reference"] == 0.0 and different["ssim"] == 1.0
    assert different["l1"] < different["ssim"]
