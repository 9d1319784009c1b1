"""Concurrency on SQLite and PostgreSQL: duplicate submissions of one trial store exactly
one vote, and participants racing for the same items never push an item past K."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from sqlalchemy import func, select, text

from study_app import create_app
from study_app.extensions import db
from study_app.models import Item, Participant, Trial, Vote
from tests.study_support import Participant as ApiParticipant
from tests.study_support import make_study, vote_body, write_stimulus_set

THREADS = 12


def _in_threads(n: int, fn) -> list:
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        results[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_duplicate_submissions_store_exactly_one_vote(db_app, tmp_path):
    slug = make_study(db_app, write_stimulus_set(tmp_path / "set"), votes_per_item=2)
    participant = ApiParticipant(db_app.test_client(), slug)
    response = participant.next()
    assert response.status_code == 200, response.get_json()
    trials = response.get_json()["trials"]
    same, contested = trials[0]["token"], trials[1]["token"]

    def submit_same(_i):
        response = db_app.test_client().post("/api/v1/participant/votes",
                                             headers=participant.headers,
                                             json=vote_body(same, "right"))
        return response.status_code, response.get_json()

    results = _in_threads(THREADS, submit_same)
    assert {status for status, _ in results} == {200}
    assert all(body == results[0][1] for _, body in results), "replays answered differently"

    def submit_contested(i):
        choice = "left" if i % 2 else "right"
        response = db_app.test_client().post("/api/v1/participant/votes",
                                             headers=participant.headers,
                                             json=vote_body(contested, choice))
        return response.status_code, choice, response.get_json()

    results = _in_threads(THREADS, submit_contested)
    winners = {body["vote"]["choice"] for status, _, body in results if status == 200}
    assert len(winners) == 1
    for status, choice, body in results:
        assert (status, body.get("code")) in ((200, None), (409, "vote_conflict"))
        assert (status == 200) == (choice in winners)
    with db_app.app_context():
        per_trial = dict(db.session.execute(
            select(Trial.token, func.count(Vote.id)).join(Vote).group_by(Trial.token)).all())
        assert per_trial == {same: 1, contested: 1}
        # exact counters: a duplicate that lost the race after the fast path's first
        # updates (PostgreSQL) must have rolled them back
        answered_main = db.session.scalar(select(func.count(Trial.id)).where(
            Trial.status == "answered", Trial.kind == "main"))
        assert db.session.scalar(select(func.sum(Item.n_votes))) == answered_main
        assert db.session.scalar(select(func.sum(Item.n_a_left))) == db.session.scalar(
            select(func.count(Trial.id)).where(Trial.status == "answered", Trial.kind == "main",
                                               Trial.a_left.is_(True)))
        assert db.session.scalar(select(Participant.n_answered)) == 2
        assert sorted(db.session.scalars(select(Vote.trial_index))) == [0, 1]
        assert db.session.scalar(select(Vote.choice).join(Trial).where(
            Trial.token == contested)) in winners


def test_racing_participants_never_push_an_item_past_k(db_app, tmp_path):
    # 2 images × 1 pair = 2 items, K = 3: 6 main votes for 12 eager participants.
    slug = make_study(db_app, write_stimulus_set(tmp_path / "set", n_images=2,
                                                 conditions=("a", "b")),
                      votes_per_item=3, trials_per_participant=2, catch_trials=0,
                      repeat_trials=0, batch_size=2)

    def participate(_i):
        client = db_app.test_client()
        participant = ApiParticipant(client, slug)
        return participant.complete()

    votes = _in_threads(THREADS, participate)
    assert sum(votes) == 6
    with db_app.app_context():
        per_item = Counter(db.session.scalars(
            select(Trial.item_id).join(Vote).where(Trial.kind == "main")))
        assert sorted(per_item.values()) == [3, 3]
        counters = dict(db.session.execute(select(Item.id, Item.n_votes)).all())
        assert counters == dict(per_item)
        for n_a_left in db.session.scalars(select(Item.n_a_left)):
            assert n_a_left in (1, 2)  # sides balanced: 3 votes split 1/2 or 2/1


def _participant_with_trials(url: str, tmp_path) -> tuple:
    """A small live study on ``url`` (schema by create_all) and one participant with
    leased trials: ``(app, participant, trial tokens)``."""
    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": url,
                      "PARTICIPANT_RATE_LIMIT": (10**6, 60.0)})
    with app.app_context():
        db.create_all()
    slug = make_study(app, write_stimulus_set(tmp_path / "set"), votes_per_item=3,
                      trials_per_participant=6)
    participant = ApiParticipant(app.test_client(), slug)
    return app, participant, [t["token"] for t in participant.next().get_json()["trials"]]


@pytest.mark.postgres
@pytest.mark.parametrize("idle_ping", [True, False], ids=["idle-ping", "retry-in-use"])
def test_a_restarted_server_costs_no_vote(postgres_server, postgres_url, tmp_path, monkeypatch,
                                          idle_ping):
    """Every pooled connection dies (as in a PostgreSQL restart). A connection idle past
    PING_AFTER_IDLE_S is pinged and replaced before use; one that fails in use makes the
    write retry on a new connection. Either way the next votes are stored, once."""
    import psycopg

    from study_app import extensions

    monkeypatch.setattr(extensions, "PING_AFTER_IDLE_S", 0.0 if idle_ping else 3600.0)
    app, participant, tokens = _participant_with_trials(postgres_url, tmp_path)
    assert participant.vote(tokens[0]).status_code == 200
    database = postgres_url.rsplit("/", 1)[1]
    with psycopg.connect(host=postgres_server.host, port=postgres_server.port,
                         user=postgres_server.user, dbname="postgres", autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s",
            (database,)).fetchone()[0]
    assert killed >= 1  # the app's pooled connection(s) are gone
    if idle_ping:  # a read is not retried: only the ping before use can save it
        me = participant.client.get("/api/v1/participant", headers=participant.headers)
        assert me.status_code == 200, me.get_json()
    for token in tokens[1:3]:
        response = participant.vote(token)
        assert response.status_code == 200, response.get_json()
    with app.app_context():
        assert db.session.scalar(select(func.count(Vote.id))) == 3
        assert db.session.scalar(select(Participant.n_answered)) == 3
        db.engine.dispose()


@pytest.mark.postgres
def test_a_connection_lost_inside_the_vote_statement_is_retried(postgres_server, postgres_url,
                                                               tmp_path, monkeypatch):
    """The PostgreSQL hot path talks to the driver directly; when its connection dies right
    before the statement, the retry loop still sees a lost connection (SQLAlchemy's
    rollback on it reports it), the pool drops it and the vote is stored once."""
    import psycopg

    from study_app import scheduling

    app, participant, (token, *_) = _participant_with_trials(postgres_url, tmp_path)
    real_statement, killed = scheduling.record_vote_postgresql, []

    def killed_first(connection, *args):
        if not killed:  # the first attempt's backend is terminated under its feet
            backend = connection.connection.driver_connection.info.backend_pid
            with psycopg.connect(host=postgres_server.host, port=postgres_server.port,
                                 user=postgres_server.user, dbname="postgres",
                                 autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (backend,))
            killed.append(backend)
        return real_statement(connection, *args)

    monkeypatch.setattr(scheduling, "record_vote_postgresql", killed_first)
    response = participant.vote(token)
    assert response.status_code == 200, response.get_json()
    assert killed
    with app.app_context():
        assert db.session.scalar(select(func.count(Vote.id))) == 1
        assert db.session.scalar(select(Participant.n_answered)) == 1
        db.engine.dispose()


def test_a_driver_error_on_the_sqlite_hot_path_is_retried_like_any_other(tmp_path,
                                                                        monkeypatch):
    """The SQLite hot path runs its statements on the sqlite3 connection itself, so a
    "database is locked" there comes from the driver, not from SQLAlchemy; it must still
    be retried (a fault injected on the first attempt) and leave nothing half-written."""
    import sqlite3

    from study_app import scheduling

    app, participant, (token, *_) = _participant_with_trials(
        f"sqlite:///{tmp_path / 'locked.sqlite3'}", tmp_path)
    real_path, attempts = scheduling.record_vote_sqlite, []

    def locked_once(connection, *args):
        attempts.append(1)
        answer = real_path(connection, *args)  # writes, then the "lock" strikes
        if len(attempts) == 1:
            raise sqlite3.OperationalError("database is locked")
        return answer

    monkeypatch.setattr(scheduling, "record_vote_sqlite", locked_once)
    response = participant.vote(token)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["vote"]["trial_index"] == 0
    assert len(attempts) == 2
    with app.app_context():
        assert db.session.scalar(select(func.count(Vote.id))) == 1
        assert db.session.scalar(select(Participant.n_answered)) == 1
        kind = db.session.scalar(select(Trial.kind).where(Trial.token == token))
        assert db.session.scalar(select(func.sum(Item.n_votes))) == (kind == "main")
        db.engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("prepare_threshold", ["default", None])
def test_the_vote_statement_follows_psycopgs_prepare_policy(postgres_url, tmp_path,
                                                           prepare_threshold):
    """psycopg prepares a statement server-side after 5 uses on a connection; behind
    PgBouncer (transaction mode) that must be switched off with
    ``connect_args={"prepare_threshold": None}``, and the hot path obeys it too."""
    options = {} if prepare_threshold == "default" else {
        "connect_args": {"prepare_threshold": None}}
    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": postgres_url,
                      "SQLALCHEMY_ENGINE_OPTIONS": {**options, "pool_size": 1},
                      "PARTICIPANT_RATE_LIMIT": (10**6, 60.0)})
    with app.app_context():
        db.create_all()
    slug = make_study(app, write_stimulus_set(tmp_path / "set"), votes_per_item=3,
                      trials_per_participant=8, batch_size=8, catch_trials=0,
                      repeat_trials=0)
    participant = ApiParticipant(app.test_client(), slug)
    tokens = [t["token"] for t in participant.next().get_json()["trials"]]
    assert len(tokens) == 8
    for token in tokens:
        assert participant.vote(token).status_code == 200
    with app.app_context():
        prepared = db.session.scalars(select(text(
            "statement FROM pg_prepared_statements WHERE statement LIKE '%WITH found AS%'"
        ))).all()
        db.engine.dispose()
    assert len(prepared) == (1 if prepare_threshold == "default" else 0)


def test_a_gunicorn_worker_freezes_what_it_loaded_for_the_garbage_collector():
    """study_app/gunicorn.conf.py's post_worker_init moves the loaded app's objects to the
    collector's permanent generation (a full collection in a worker paused all its
    threads ~60 ms before)."""
    import gc
    import runpy

    from tests.support import REPO

    settings = runpy.run_path(str(REPO / "study_app" / "gunicorn.conf.py"))
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    try:
        settings["post_worker_init"](None)
        assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()
