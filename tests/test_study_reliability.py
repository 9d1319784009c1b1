"""Reliability (not timing): gunicorn with 4 workers, 100 synthetic participants at once,
workers SIGKILLed several times meanwhile. Afterwards every acknowledged vote is stored
exactly once, no item has more than K votes, and the export holds exactly the
acknowledged votes. On SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import random
import signal
import threading
from collections import Counter

import pytest
from sqlalchemy import func, select

from study_app.commands import make_app
from study_app.export import read_responses
from study_app.extensions import db
from study_app.models import Item, Participant, Trial, Vote
from study_app.simulate import run_simulation
from tests.study_support import make_study, write_stimulus_set
from tests.support import gunicorn_workers, start_gunicorn, stop_gunicorn

K = 20
KILLS = 4


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'reliability.sqlite3'}"
    return request.getfixturevalue("postgres_url")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_acknowledged_votes_survive_killed_workers_exactly_once(database_url, tmp_path):
    app = make_app(database_url)  # migrations up to head
    slug = make_study(app, write_stimulus_set(tmp_path / "set", n_images=4),
                      votes_per_item=K, trials_per_participant=4, catch_trials=1,
                      repeat_trials=1, batch_size=3)
    with app.app_context():
        db.engine.dispose()
    server, base = start_gunicorn(database_url, tmp_path)
    killed: list[int] = []
    stop = threading.Event()
    try:
        def killer() -> None:
            rng = random.Random(5)
            while not stop.wait(0.6) and len(killed) < KILLS:
                workers = gunicorn_workers(server.pid)
                if len(workers) >= 2:
                    victim = rng.choice(workers)
                    os.kill(victim, signal.SIGKILL)
                    killed.append(victim)

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        result = run_simulation(base, slug, participants=100, concurrency=100,
                                observer="random", seed=11, progress=False)
        stop.set()
        thread.join(timeout=10)
    finally:
        stop.set()
        stop_gunicorn(server)

    assert len(killed) >= 3, f"only {len(killed)} workers were killed during the run"
    assert result.errors == []
    assert result.completed == 100
    acknowledged = {(v.trial_token, v.choice) for v in result.votes}
    assert len(acknowledged) == len(result.votes), "a trial was acknowledged twice"

    with app.app_context():
        stored = db.session.execute(select(Trial.token, Vote.choice).join(Vote)).all()
        assert Counter(stored) == Counter(acknowledged)  # each acknowledged vote exactly once
        per_item = Counter(db.session.scalars(
            select(Trial.item_id).join(Vote).where(Trial.kind == "main")))
        assert max(per_item.values()) <= K
        assert dict(db.session.execute(select(Item.id, Item.n_votes)
                                       .where(Item.n_votes > 0)).all()) == dict(per_item)
        assert sum(per_item.values()) == 12 * K  # demand (400) exceeds supply: all filled
        statuses = set(db.session.scalars(select(Participant.status)))
        assert statuses == {"completed"}
        assert db.session.scalar(select(func.count(Participant.id))) == 100
        db.engine.dispose()

    exported = read_responses(database_url, slug)
    assert len(exported) == len(acknowledged)
    assert Counter(zip(exported["participant"], exported["choice"], strict=True)) == Counter(
        (v.participant, v.choice) for v in result.votes)
