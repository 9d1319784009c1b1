"""The K quota under leases that run out while a vote is on its way, on SQLite and
PostgreSQL: a vote is judged at the time read once its transaction holds its locks, so a
vote that waited for the lock past its lease's expiry is refused, and answers straddling
expiry never push an item past K."""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections import Counter
from datetime import datetime

from sqlalchemy import create_engine, func, select, text

from study_app.extensions import db
from study_app.models import Item, Participant, Trial, Vote
from tests.study_support import Participant as ApiParticipant
from tests.study_support import make_study, vote_body, write_stimulus_set


def _expires(trial: dict) -> float:
    return datetime.fromisoformat(trial["expires_at"].replace("Z", "+00:00")).timestamp()


class _HeldLock:
    """Another writer holding what a lease of another participant would hold: the
    SQLite write lock, or the item's row lock on PostgreSQL."""

    def __init__(self, url: str, item_id: int):
        self.sqlite = url.startswith("sqlite")
        if self.sqlite:
            self.connection = sqlite3.connect(url.removeprefix("sqlite:///"),
                                              isolation_level=None)
            self.connection.execute("BEGIN IMMEDIATE")
        else:
            self.engine = create_engine(url)
            self.connection = self.engine.connect()
            self.connection.execute(text("SELECT id FROM item WHERE id = :id FOR UPDATE"),
                                    {"id": item_id})

    def release(self) -> None:
        if self.sqlite:
            self.connection.execute("ROLLBACK")
            self.connection.close()
        else:
            self.connection.rollback()
            self.connection.close()
            self.engine.dispose()


def _one_short_lease(app, url: str, tmp_path) -> tuple:
    """A study with 2 s leases and K = 1, one participant holding one trial, and another
    writer holding that trial's item: ``(slug, participant, trial, held lock, item id)``.
    (2 s, not 1: the tests need 0.3 s of the lease left once the lock is held, and a CI
    run once spent 0.75 s between the lease and that check.)"""
    slug = make_study(app, write_stimulus_set(tmp_path / "set", n_images=2,
                                              conditions=("a", "b")),
                      votes_per_item=1, trials_per_participant=2, catch_trials=0,
                      repeat_trials=0, batch_size=1, lease_seconds=2)
    participant = ApiParticipant(app.test_client(), slug)
    trial = participant.next().get_json()["trials"][0]
    with app.app_context():
        item_id = db.session.scalar(select(Trial.item_id).where(Trial.token == trial["token"]))
    return slug, participant, trial, _HeldLock(url, item_id), item_id


def test_a_vote_that_waits_for_the_lock_past_its_lease_is_refused(db_app, any_database_url,
                                                                  tmp_path):
    slug, participant, trial, held, item_id = _one_short_lease(db_app, any_database_url,
                                                               tmp_path)
    answer: dict = {}

    def send() -> None:  # sent well before expiry, but it must wait for the lock
        response = db_app.test_client().post("/api/v1/participant/votes",
                                             headers=participant.headers,
                                             json=vote_body(trial["token"]))
        answer.update(status=response.status_code, body=response.get_json())

    sent_at = time.time()
    assert sent_at < _expires(trial) - 0.3, "the lease ran out before the test could vote"
    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(max(0.0, _expires(trial) + 0.3 - time.time()))
    assert "status" not in answer, f"the vote did not wait for the lock: {answer}"
    held.release()
    sender.join(timeout=30)
    assert answer["status"] == 410, answer
    assert answer["body"]["code"] == "trial_expired"
    with db_app.app_context():
        assert db.session.scalar(select(func.count(Vote.id))) == 0
        assert db.session.scalar(select(Item.n_votes).where(Item.id == item_id)) == 0
    # the item went back to the pool: another participant gets it and votes on it
    other = ApiParticipant(db_app.test_client(), slug)
    trials = other.next().get_json()["trials"]
    assert [t["token"] for t in trials]
    assert other.vote(trials[0]["token"]).status_code == 200


def test_a_renewal_that_waits_for_the_lock_past_the_lease_does_not_revive_it(
        db_app, any_database_url, tmp_path):
    """Asking for the next trials renews open leases; one that ran out while the request
    waited for the item (held by another participant's lease, which may have judged it
    expired and leased the item again) stays expired."""
    _slug, participant, trial, held, _item = _one_short_lease(db_app, any_database_url,
                                                              tmp_path)
    answer: dict = {}

    def ask() -> None:
        response = db_app.test_client().post("/api/v1/participant/trials/next",
                                             headers=participant.headers)
        answer.update(status=response.status_code, body=response.get_json())

    assert time.time() < _expires(trial) - 0.3, "the lease ran out before the test could ask"
    asker = threading.Thread(target=ask)
    asker.start()
    time.sleep(max(0.0, _expires(trial) + 0.3 - time.time()))
    assert "status" not in answer, f"the request did not wait for the lock: {answer}"
    held.release()
    asker.join(timeout=30)
    assert answer["status"] == 200, answer
    assert trial["token"] not in [t["token"] for t in answer["body"]["trials"]]
    assert participant.vote(trial["token"]).status_code == 410


PARTICIPANTS = 6
JITTER_S = 0.03


def test_answers_straddling_expiry_never_push_an_item_past_k(db_app, tmp_path):
    """K = 1, leases of 1 s; every participant answers and asks again within ±30 ms of
    its lease's expiry, so re-leases of expired items race the late votes on them. Every
    acknowledged vote is stored once, every refused one is not, and no item has more
    than K votes."""
    slug = make_study(db_app, write_stimulus_set(tmp_path / "set", n_images=3,
                                                 conditions=("a", "b", "c")),
                      votes_per_item=1, trials_per_participant=9, catch_trials=0,
                      repeat_trials=0, batch_size=1, lease_seconds=1, seed=3)
    acknowledged: list[str] = []
    refused: list[str] = []
    barrier = threading.Barrier(PARTICIPANTS)

    def participate(i: int) -> None:
        rng = random.Random(i)
        participant = ApiParticipant(db_app.test_client(), slug)
        barrier.wait()
        deadline = time.time() + 8.0
        while time.time() < deadline:
            body = participant.next().get_json()
            if body["done"]:
                return
            if not body["trials"]:
                time.sleep(rng.uniform(0, JITTER_S))
                continue
            trial = body["trials"][0]
            time.sleep(max(0.0, _expires(trial) + rng.uniform(-JITTER_S, JITTER_S / 3)
                           - time.time()))
            response = participant.vote(trial["token"], rng.choice(["left", "right"]))
            assert response.status_code in (200, 410), response.get_json()
            (acknowledged if response.status_code == 200 else refused).append(trial["token"])

    threads = [threading.Thread(target=participate, args=(i,)) for i in range(PARTICIPANTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert acknowledged and refused, "the run never straddled an expiry: nothing was tested"
    with db_app.app_context():
        stored = list(db.session.scalars(select(Trial.token).join(Vote)))
        assert Counter(stored) == Counter(acknowledged)
        assert not set(stored) & set(refused)
        per_item = Counter(db.session.scalars(
            select(Trial.item_id).join(Vote).where(Trial.kind == "main")))
        assert max(per_item.values()) <= 1, f"items over K: {per_item}"
        assert dict(db.session.execute(
            select(Item.id, Item.n_votes).where(Item.n_votes > 0)).all()) == dict(per_item)
        assert db.session.scalar(select(func.sum(Participant.n_answered))) == len(stored)
