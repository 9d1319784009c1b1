"""The participant JSON API over real SQLite and PostgreSQL databases (each test runs on
both: the vote's fast path differs per database): the happy path, resume, exactly-once
replays, and every refused request answering 4xx JSON with no state change."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from study_app import create_app
from study_app.extensions import db
from study_app.models import Item, Participant, Trial, Vote, utcnow
from tests.study_support import Participant as P
from tests.study_support import log_in_as_researcher, make_study, vote_body, write_stimulus_set


@pytest.fixture
def app(any_database_url):
    """A fresh app with the schema created, on SQLite or on a new PostgreSQL database."""
    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": any_database_url,
                      "SECRET_KEY": "test-secret"})
    with app.app_context():
        db.create_all()
    yield app
    with app.app_context():
        db.engine.dispose()


@pytest.fixture
def stimulus_root(tmp_path):
    return write_stimulus_set(tmp_path / "set")


@pytest.fixture
def slug(app, stimulus_root):
    return make_study(app, stimulus_root, votes_per_item=3, trials_per_participant=6,
                      completion_code="C0DE42",
                      completion_url="https://app.prolific.com/submissions/complete?cc=C0DE42")


def snapshot(app) -> tuple:
    """Everything a refused request must leave unchanged."""
    with app.app_context():
        return (
            db.session.scalar(select(func.count(Vote.id))),
            tuple(db.session.execute(select(Trial.id, Trial.status).order_by(Trial.id)).all()),
            tuple(db.session.execute(select(Item.id, Item.n_votes, Item.n_a_left)
                                     .order_by(Item.id)).all()),
            tuple(db.session.execute(select(Participant.id, Participant.status,
                                            Participant.n_answered).order_by(Participant.id))
                  .all()),
        )


def leases(app) -> tuple:
    """Every trial's lease (status, expiry): what `trials/next` renews."""
    with app.app_context():
        return tuple(db.session.execute(
            select(Trial.id, Trial.status, Trial.expires_at).order_by(Trial.id)).all())


def test_study_description_hides_conditions_and_draft_studies(app, client, stimulus_root):
    make_study(app, stimulus_root, slug="hidden", status="draft")
    make_study(app, stimulus_root, slug="shown", title="Shown", practice_trials=3)
    assert client.get("/api/v1/studies/hidden").status_code == 404
    body = client.get("/api/v1/studies/shown").get_json()["study"]
    assert body["title"] == "Shown" and body["status"] == "live"
    assert body["question"] == "Which image is closer to the reference?"
    assert body["display"]["image_size"] == [8, 8]
    assert len(body["practice"]) == 3
    for practice in body["practice"]:
        correct_url = practice[f"{practice['correct']}_url"]
        assert correct_url == practice["reference_url"]
    text = str(body)
    assert "l1" not in text and "ssim" not in text  # participants stay blind
    missing = client.get("/api/v1/studies/nope")
    assert missing.status_code == 404 and missing.get_json()["code"] == "unknown_study"


def test_a_participant_completes_a_study_and_gets_the_completion_code(app, client, slug):
    participant = P(client, slug, prolific_pid="PID1", study_id="S1", session_id="X1")
    assert participant.start_response.status_code == 201
    votes = participant.complete()
    assert votes == 6 + 2 + 2  # main + catch + repeat
    finished = participant.finish().get_json()
    assert finished["participant"]["status"] == "completed"
    assert finished["completion_code"] == "C0DE42"
    assert finished["redirect_url"].endswith("cc=C0DE42")
    with app.app_context():
        kinds = db.session.execute(select(Trial.kind, func.count()).join(Vote)
                                   .group_by(Trial.kind)).all()
        assert dict(kinds) == {"main": 6, "catch": 2, "repeat": 2}
        indices = db.session.scalars(select(Vote.trial_index).order_by(Vote.id)).all()
        assert indices == list(range(10))
    again = participant.finish()  # finishing twice is a no-op
    assert again.status_code == 200 and again.get_json()["completion_code"] == "C0DE42"
    assert participant.finish("returned").status_code == 409


def test_same_prolific_pid_resumes_the_same_participant(app, client, slug):
    first = P(client, slug, prolific_pid="PID7")
    trials = first.next().get_json()["trials"]
    assert first.vote(trials[0]["token"]).status_code == 200
    second = P(client, slug, prolific_pid="PID7")
    assert second.start_response.status_code == 200
    assert second.start_response.get_json()["resumed"] is True
    assert second.token == first.token
    resumed = second.next().get_json()
    tokens = [t["token"] for t in resumed["trials"]]
    assert tokens[:3] == [t["token"] for t in trials[1:]]  # open trials first, in order
    assert len(tokens) == 4 and trials[0]["token"] not in tokens  # topped up to the batch
    assert resumed["progress"]["answered"] == 1
    by_token = P(client, slug, participant_token=first.token)
    assert by_token.token == first.token
    with app.app_context():
        assert db.session.scalar(select(func.count(Participant.id))) == 1
    other = P(client, slug, prolific_pid="PID8")
    assert other.token != first.token


def test_replayed_vote_is_stored_once_and_answers_the_same(app, client, slug):
    participant = P(client, slug)
    token = participant.next().get_json()["trials"][0]["token"]
    first = participant.vote(token, "right")
    before = snapshot(app)
    replay = participant.vote(token, "right", rt_ms=999.0)
    assert first.status_code == replay.status_code == 200
    assert first.get_json() == replay.get_json()
    assert replay.headers["X-Idempotent-Replay"] == "true"
    assert "X-Idempotent-Replay" not in first.headers
    assert snapshot(app) == before
    conflict = participant.vote(token, "left")
    assert conflict.status_code == 409 and conflict.get_json()["code"] == "vote_conflict"
    assert snapshot(app) == before


@contextmanager
def statements_sent(app) -> Iterator[list[str]]:
    """The first word of every statement the app sends to the database meanwhile, seen at
    the driver (the vote's fast path bypasses SQLAlchemy's cursor events): SQLite's trace
    callback, psycopg's cursor and its BEGIN/COMMIT commands."""
    from sqlalchemy import event

    sent: list[str] = []
    with app.app_context():
        engine = db.engine

    def first_word(sql) -> str:
        sql = sql.decode() if isinstance(sql, bytes) else str(sql)
        return sql.split()[0].upper()

    if engine.dialect.name == "sqlite":
        def on_checkout(dbapi_connection, _record, _proxy):
            dbapi_connection.set_trace_callback(lambda sql: sent.append(first_word(sql)))

        engine.dispose()  # connections made from now on are traced from their checkout
        event.listen(engine, "checkout", on_checkout)
        try:
            yield sent
        finally:
            event.remove(engine, "checkout", on_checkout)
            engine.dispose()
        return
    import psycopg
    import psycopg._connection_base

    execute, command = psycopg.Cursor.execute, psycopg._connection_base.BaseConnection._exec_command

    def recorded_execute(self, query, *args, **kwargs):
        sent.append(first_word(query))
        return execute(self, query, *args, **kwargs)

    def recorded_command(self, query, *args, **kwargs):
        sent.append(first_word(query))
        return command(self, query, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(psycopg.Cursor, "execute", recorded_execute)
        patch.setattr(psycopg._connection_base.BaseConnection, "_exec_command", recorded_command)
        yield sent


@pytest.mark.parametrize("question_mode", ["reference", "no-reference"])
def test_a_fresh_vote_takes_the_few_statement_path_and_stores_every_field(
        app, client, stimulus_root, question_mode):
    """The vote endpoint is the hot path (docs/benchmarks.md): on SQLite one read, the
    participant / item / trial updates and the insert; on PostgreSQL one statement and no
    BEGIN/COMMIT. The stored row is complete either way."""
    slug = make_study(app, stimulus_root, slug="fast", question_mode=question_mode,
                      votes_per_item=3, trials_per_participant=6)
    participant = P(client, slug)
    trials = participant.next().get_json()["trials"]
    with statements_sent(app) as sent:
        response = participant.vote(trials[1]["token"], "right", rt_ms=640.0)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["vote"]["trial_index"] == 0
    if app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite"):
        work = [word for word in sent if word not in ("BEGIN", "COMMIT")]
        assert work.count("SELECT") == 1 and work.count("INSERT") == 1, sent
        # 5 statements; SQLite's trace repeats the item's UPDATE 4 times more: the trigger
        # that keeps pair_tally and its 3 steps (run inside that statement, not sent)
        assert len(work) <= 5 + 4 and sent.count("COMMIT") == 1, sent
    else:
        assert sent == ["WITH"], sent
    with app.app_context():
        vote = db.session.scalars(select(Vote)).one()
        trial = db.session.get(Trial, vote.trial_id)
        assert trial.token == trials[1]["token"] and trial.status == "answered"
        assert vote.chosen_condition == trial.condition_right
        assert (vote.choice, vote.rt_ms, vote.viewport_w, vote.device_pixel_ratio) == (
            "right", 640.0, 1280, 2.0)
        assert vote.reference_shown is (question_mode == "reference")
        assert vote.presented_at.isoformat() == "2025-01-01T12:00:00+00:00"
        assert vote.received_at.isoformat(timespec="milliseconds").replace("+00:00", "Z") == \
            response.get_json()["vote"]["received_at"]
        if trial.kind == "main":
            item = db.session.get(Item, trial.item_id)
            assert (item.n_votes, item.n_a_left) == (1, 1 if trial.a_left else 0)
        assert db.session.get(Participant, vote.participant_id).n_answered == 1
    second = participant.vote(trials[0]["token"], "left")
    assert second.get_json()["vote"]["trial_index"] == 1


@contextmanager
def statements_built() -> Iterator[list[str]]:
    """Where study_app code builds a SQL statement meanwhile, outside the statement
    builders (the ``functools.cache``d functions of the fetch path, which build each
    statement once per process): a ``select()`` or a generative step (``.where()``,
    ``.limit()``...) whose nearest caller outside SQLAlchemy's ``sql`` package is such
    code. SQLAlchemy's own ORM internals (e.g. ``Session.get``) are not counted."""
    import sys

    from sqlalchemy.sql import base, selectable

    from study_app import active, api, scheduling

    builders = {
        function.__wrapped__.__code__
        for module in (scheduling, active, api)
        for function in vars(module).values()
        if getattr(function, "__module__", None) == module.__name__
        and hasattr(function, "cache_info")
    }
    assert len(builders) >= 15  # the fetch path's builders were found
    built: list[str] = []

    def note() -> None:
        frame = sys._getframe(2)
        while frame is not None and ("/sqlalchemy/sql/" in frame.f_code.co_filename
                                     or frame.f_code.co_filename.startswith("<sqlalchemy")):
            frame = frame.f_back  # (SQLAlchemy's generated wrappers: "<sqlalchemy ...>")
        if (frame is not None and "/study_app/" in frame.f_code.co_filename
                and frame.f_code not in builders):
            built.append(f"{frame.f_code.co_filename}:{frame.f_lineno}")

    init, generate = selectable.Select.__init__, base.Generative._generate

    def counted_init(self, *args, **kwargs):
        note()
        return init(self, *args, **kwargs)

    def counted_generate(self):
        note()
        return generate(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(selectable.Select, "__init__", counted_init)
        patch.setattr(base.Generative, "_generate", counted_generate)
        yield built


# the statements a fetch of 4 new trials sends here (no BEGIN/COMMIT; SQLite's trace shows
# the 4 inserts as 4), measured: an added read per pair or per trial fails here
# (docs/benchmarks.md "Serving cost"). This study is small: in the active design a chosen
# pair has fewer free items than the fetch wants as candidates, so the study's leased items
# are read too (a large study's fetch skips that read: one statement fewer).
FETCH_STATEMENTS = {("sqlite", "balanced"): 16, ("sqlite", "active"): 22,
                    ("postgresql", "balanced"): 15, ("postgresql", "active"): 21}


@pytest.mark.parametrize("design", ["balanced", "active"])
def test_a_fetch_builds_no_statement_and_sends_a_fixed_few(app, client, stimulus_root, design):
    """``trials/next`` is the other hot path: its statements are built once per process
    (every value a bind parameter) and a fetch sends a small, fixed number of them."""
    slug = make_study(app, stimulus_root, slug=f"few-{design}", design=design,
                      votes_per_item=3, trials_per_participant=8, catch_trials=0,
                      repeat_trials=0, practice_trials=0)
    first, participant = P(client, slug), P(client, slug)
    with app.app_context():  # fixed public ids: they seed each fetch's random draw starts,
        for n, person in enumerate((first, participant)):  # so every run reads the same
            db.session.execute(update(Participant).where(Participant.token == person.token)
                               .values(public_id=f"fixed-{design}-{n}"))
        db.session.commit()
        dialect = db.engine.dialect.name
    assert len(first.next().get_json()["trials"]) == 4
    with statements_built() as built, statements_sent(app) as sent:
        response = participant.next()
    assert response.status_code == 200 and len(response.get_json()["trials"]) == 4
    assert built == [], built
    work = [word for word in sent if word not in ("BEGIN", "COMMIT")]
    assert len(work) <= FETCH_STATEMENTS[dialect, design], sent
    # and the same study still serves: the first participant's open trials come back
    assert len(first.next().get_json()["trials"]) == 4


BAD_VOTES = [
    ({"choice": "middle"}, "choice"),
    ({"choice": None}, "choice"),
    ({"rt_ms": -1}, "rt_ms"),
    ({"rt_ms": "fast"}, "rt_ms"),
    ({"rt_ms": True}, "rt_ms"),
    ({"rt_ms": 10**9}, "rt_ms"),
    ({"presented_at": "yesterday"}, "presented_at"),
    ({"presented_at": "2025-01-01T12:00:00"}, "presented_at"),  # no time zone
    ({"answered_at": "2024-12-31T12:00:00Z"}, "answered_at"),  # before presented_at
    ({"viewport_w": 0}, "viewport_w"),
    ({"viewport_h": 10.5}, "viewport_h"),
    ({"device_pixel_ratio": 0}, "device_pixel_ratio"),
    ({"trial_token": "short"}, "trial_token"),
    ({"extra": 1}, "extra"),
]


# A frame-timed exposure as the participant page sends it (100 ms at 60 Hz: 6 frames).
TIMING = {"exposure_requested_ms": 100, "frame_period_ms": 16.667,
          "exposure_frames_requested": 6, "exposure_onset_ms": 5012.25,
          "exposure_offset_ms": 5112.25, "exposure_frames_measured": 6}
BAD_TIMINGS = [
    ({"exposure_onset_ms": None}, "exposure_onset_ms"),
    ({"frame_period_ms": 0}, "frame_period_ms"),
    ({"frame_period_ms": "60 Hz"}, "frame_period_ms"),
    ({"exposure_frames_requested": 1.5}, "exposure_frames_requested"),
    ({"exposure_requested_ms": 10**6}, "exposure_requested_ms"),
    ({"exposure_offset_ms": 4000.0}, "exposure_offset_ms"),  # before the onset
    ({"exposure_frames_measured": -1}, "exposure_frames_measured"),
]


def test_a_vote_stores_its_frame_timing(app, client, slug):
    participant = P(client, slug)
    trials = participant.next().get_json()["trials"]
    assert participant.vote(trials[0]["token"], **TIMING).status_code == 200
    assert participant.vote(trials[1]["token"]).status_code == 200  # no timing: nulls
    with app.app_context():
        votes = db.session.scalars(select(Vote).order_by(Vote.trial_index)).all()
        assert {name: getattr(votes[0], name) for name in TIMING} == pytest.approx(TIMING)
        assert all(getattr(votes[1], name) is None for name in TIMING)


@pytest.mark.parametrize(("change", "field"), BAD_TIMINGS)
def test_malformed_timing_is_400_and_changes_nothing(app, client, slug, change, field):
    participant = P(client, slug)
    token = participant.next().get_json()["trials"][0]["token"]
    before = snapshot(app)
    body = {**TIMING, **change}
    if change == {"exposure_onset_ms": None}:  # one of the six left out
        del body["exposure_onset_ms"]
    response = participant.vote(token, **body)
    assert response.status_code == 400, response.get_json()
    answer = response.get_json()
    assert answer["field"] == field and field in answer["error"]
    assert snapshot(app) == before


@pytest.mark.parametrize(("change", "field"), BAD_VOTES)
def test_malformed_votes_are_400_and_change_nothing(app, client, slug, change, field):
    participant = P(client, slug)
    token = participant.next().get_json()["trials"][0]["token"]
    before = snapshot(app)
    response = participant.vote(token, **change)
    assert response.status_code == 400
    body = response.get_json()
    assert body["field"] == field and body["status"] == 400 and body["error"]
    assert snapshot(app) == before


def test_missing_field_non_json_and_oversized_bodies(app, client, slug):
    participant = P(client, slug)
    token = participant.next().get_json()["trials"][0]["token"]
    before = snapshot(app)
    body = vote_body(token)
    del body["rt_ms"]
    missing = client.post("/api/v1/participant/votes", headers=participant.headers, json=body)
    assert missing.status_code == 400 and missing.get_json()["field"] == "rt_ms"
    form = client.post("/api/v1/participant/votes", headers=participant.headers,
                       data="choice=left", content_type="application/x-www-form-urlencoded")
    assert form.status_code == 415
    garbage = client.post("/api/v1/participant/votes", headers=participant.headers,
                          data="{not json", content_type="application/json")
    assert garbage.status_code == 400 and garbage.get_json()["code"] == "malformed_json"
    huge = client.post("/api/v1/participant/votes", headers=participant.headers,
                       json={**vote_body(token), "padding": "x" * 10_000})
    assert huge.status_code == 413 and huge.is_json
    assert snapshot(app) == before


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


HOSTILE_BODIES = [
    ("nested 1,000 deep", _nested(1000), "malformed_json"),
    ("nested 2,000 deep", _nested(2000), "malformed_json"),
    ("object nested 600 deep", '{"a":' * 600 + "1" + "}" * 600, None),  # parses: unknown field
    ("duplicate key", None, "malformed_json"),
    ("NaN", '{"rt_ms": NaN}', "malformed_json"),
    ("integer of 3,990 digits", '{"rt_ms": ' + "9" * 3990 + "}", None),
    ("not UTF-8", b'{"choice": "\xff"}'.replace(b"\\xff", b"\xff"), "malformed_json"),
]


@pytest.mark.parametrize(("name", "raw", "code"), HOSTILE_BODIES,
                         ids=[case[0] for case in HOSTILE_BODIES])
@pytest.mark.parametrize("path", ["participants", "votes", "trials/next", "finish"])
def test_hostile_json_is_400_and_changes_nothing(app, client, slug, name, raw, code, path):
    participant = P(client, slug)
    token = participant.next().get_json()["trials"][0]["token"]
    if raw is None:  # the same key twice: neither value may win silently
        raw = json.dumps(vote_body(token, "left"))[:-1] + ', "choice": "right"}'
    url = (f"/api/v1/studies/{slug}/participants" if path == "participants"
           else f"/api/v1/participant/{path}")
    before = snapshot(app), leases(app)
    response = client.post(url, data=raw, content_type="application/json",
                           headers=participant.headers)
    assert response.status_code == 400, (response.status_code, response.get_data()[:200])
    assert response.get_json()["code"] == (code or response.get_json()["code"])
    assert response.get_json()["error"]
    assert (snapshot(app), leases(app)) == before


@pytest.mark.parametrize("value", [10**30, -(10**30), 2**63, 1e308, -1e308])
def test_huge_numbers_are_400(app, client, slug, value):
    participant = P(client, slug)
    token = participant.next().get_json()["trials"][0]["token"]
    before = snapshot(app)
    for field in ("viewport_w", "rt_ms", "device_pixel_ratio"):
        response = participant.vote(token, **{field: value})
        assert response.status_code == 400 and response.get_json()["field"] == field
    assert snapshot(app) == before


def test_unauthorised_unknown_foreign_and_expired_trials_are_refused(app, client, slug):
    alice, bob = P(client, slug), P(client, slug)
    alice_token = alice.next().get_json()["trials"][0]["token"]
    bob.next()
    before = snapshot(app)
    anonymous = client.post("/api/v1/participant/votes", json=vote_body(alice_token))
    assert anonymous.status_code == 401 and anonymous.get_json()["code"] == "unauthorized"
    # no token is a 401 whatever the body holds (the OpenAPI document says so)
    for body in ({}, {"choice": "up"}):
        bare = client.post("/api/v1/participant/votes", json=body)
        assert bare.status_code == 401 and bare.get_json()["code"] == "unauthorized"
    forged = client.post("/api/v1/participant/votes", json=vote_body(alice_token),
                         headers={"Authorization": "Bearer " + "x" * 32})
    assert forged.status_code == 401
    foreign = bob.vote(alice_token)
    assert foreign.status_code == 403 and foreign.get_json()["code"] == "trial_not_assigned"
    unknown = alice.vote("y" * 32)
    assert unknown.status_code == 404 and unknown.get_json()["code"] == "unknown_trial"
    assert snapshot(app) == before
    with app.app_context():
        trial = db.session.scalars(select(Trial).where(Trial.token == alice_token)).one()
        trial.expires_at = trial.leased_at - timedelta(seconds=1)
        db.session.commit()
    before = snapshot(app)
    expired = alice.vote(alice_token)
    assert expired.status_code == 410 and expired.get_json()["code"] == "trial_expired"
    assert snapshot(app) == before


def test_asking_for_trials_renews_open_leases_but_never_revives_an_expired_one(
        app, client, stimulus_root):
    """A participant still on the page keeps their trials (each `next` renews the open
    leases to lease_seconds from now); a lease that already expired stays expired."""
    slug = make_study(app, stimulus_root, slug="leases", votes_per_item=3,
                      trials_per_participant=6, batch_size=3, lease_seconds=600)
    participant = P(client, slug)
    tokens = [t["token"] for t in participant.next().get_json()["trials"]]
    assert len(tokens) == 3
    with app.app_context():
        trials = {t.token: t for t in db.session.scalars(
            select(Trial).where(Trial.token.in_(tokens)))}
        almost, gone = trials[tokens[0]], trials[tokens[1]]
        # expires soon (of its 600 s): far enough ahead for a loaded machine to ask in time
        almost.expires_at = utcnow() + timedelta(seconds=10)
        gone.expires_at = gone.leased_at - timedelta(seconds=1)  # already expired
        db.session.commit()
        gone_expiry = gone.expires_at
    asked_at = utcnow()
    listed = participant.next().get_json()["trials"]
    assert tokens[1] not in {t["token"] for t in listed}
    assert tokens[0] in {t["token"] for t in listed}
    with app.app_context():
        renewed = db.session.scalars(select(Trial).where(Trial.token == tokens[0])).one()
        assert renewed.expires_at >= asked_at + timedelta(seconds=600)
        assert renewed.status == "leased"
        still_gone = db.session.scalars(select(Trial).where(Trial.token == tokens[1])).one()
        assert still_gone.expires_at == gone_expiry
    listed_expiry = next(t["expires_at"] for t in listed if t["token"] == tokens[0])
    assert listed_expiry == renewed.expires_at.isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")
    assert participant.vote(tokens[0]).status_code == 200
    assert participant.vote(tokens[1]).status_code == 410


def test_closed_study_refuses_votes_and_new_participants(app, client, slug):
    participant = P(client, slug)
    token = participant.next().get_json()["trials"][0]["token"]
    with app.app_context():
        from study_app.studies import find_study, set_status

        set_status(find_study(slug), "closed")
        db.session.commit()
    before = snapshot(app), leases(app)
    refused = participant.vote(token)
    assert refused.status_code == 409 and refused.get_json()["code"] == "study_closed"
    newcomer = client.post(f"/api/v1/studies/{slug}/participants", json={})
    assert newcomer.status_code == 409 and newcomer.get_json()["code"] == "study_closed"
    asked = participant.next()  # the docs promise 409 for anything on a closed study
    assert asked.status_code == 409 and asked.get_json()["code"] == "study_closed"
    assert (snapshot(app), leases(app)) == before  # no lease renewed


def test_paused_study_accepts_open_votes_but_issues_nothing_new(app, client, slug):
    participant = P(client, slug)
    trials = participant.next().get_json()["trials"]
    with app.app_context():
        from study_app.studies import find_study, set_status

        set_status(find_study(slug), "paused")
        db.session.commit()
    before = leases(app)
    while_paused = participant.next().get_json()  # the open trials, leases untouched
    assert [t["token"] for t in while_paused["trials"]] == [t["token"] for t in trials]
    assert while_paused["done"] is False and leases(app) == before
    for trial in trials:
        assert participant.vote(trial["token"]).status_code == 200
    after = participant.next().get_json()
    assert after["trials"] == [] and after["done"] is False and after["study_status"] == "paused"
    assert client.post(f"/api/v1/studies/{slug}/participants", json={}).status_code == 409


def test_finish_rules_and_returned_releases_leases(app, client, slug):
    participant = P(client, slug)
    participant.next()
    early = participant.finish("completed")
    assert early.status_code == 409 and early.get_json()["code"] == "trials_open"
    returned = participant.finish("returned").get_json()
    assert returned["participant"]["status"] == "returned"
    assert returned["completion_code"] is None
    with app.app_context():
        statuses = set(db.session.scalars(select(Trial.status)))
        assert statuses == {"released"}
    assert participant.next().status_code == 409
    bad = client.post("/api/v1/participant/finish", headers=participant.headers,
                      json={"status": "done"})
    assert bad.status_code == 400


def test_start_validates_prolific_parameters_and_preview_needs_login(app, client, slug):
    bad = client.post(f"/api/v1/studies/{slug}/participants", json={"prolific_pid": "a b"})
    assert bad.status_code == 400 and bad.get_json()["field"] == "prolific_pid"
    extra = client.post(f"/api/v1/studies/{slug}/participants", json={"name": "x"})
    assert extra.status_code == 400 and extra.get_json()["code"] == "unknown_field"
    preview = client.post(f"/api/v1/studies/{slug}/participants", json={"preview": True})
    assert preview.status_code == 403
    log_in_as_researcher(app, client)
    preview = client.post(f"/api/v1/studies/{slug}/participants", json={"preview": True})
    assert preview.status_code == 201 and preview.get_json()["participant"]["preview"] is True


def test_preview_participants_do_not_count_towards_k(app, client, slug):
    log_in_as_researcher(app, client)
    previewer = P(client, slug, preview=True)
    assert previewer.complete() > 0
    with app.app_context():
        assert db.session.scalar(select(func.sum(Item.n_votes))) == 0
        assert db.session.scalar(select(func.count(Vote.id))) > 0


def test_openapi_document_lists_every_api_route(app, client):
    document = client.get("/api/v1/openapi.json").get_json()
    assert document["openapi"].startswith("3.")
    documented = {
        (path, method.upper()) for path, ops in document["paths"].items() for method in ops
    }
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith(("/api/", "/media/")):
            continue
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert (path, method) in documented, f"{method} {path} is not in the OpenAPI document"


def test_media_is_content_addressed_with_long_cache_and_etag(client, slug):
    trial = P(client, slug).next().get_json()["trials"][0]
    url = trial["left_url"]
    sha = re.match(r"^/media/([0-9a-f]{64})\.png$", url).group(1)
    response = client.get(url)
    assert response.status_code == 200 and response.mimetype == "image/png"
    import hashlib

    assert hashlib.sha256(response.data).hexdigest() == sha
    assert "immutable" in response.headers["Cache-Control"]
    assert "max-age=31536000" in response.headers["Cache-Control"]
    assert response.headers["ETag"] == f'"{sha}"'
    cached = client.get(url, headers={"If-None-Match": f'"{sha}"'})
    assert cached.status_code == 304 and cached.data == b""
    assert client.get("/media/" + "0" * 64 + ".png").status_code == 404
    assert client.get("/media/not-a-hash.png").status_code == 404
