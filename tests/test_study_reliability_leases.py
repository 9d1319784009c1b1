"""Reliability with short leases under real gunicorn: leases of 1 s, answers sent around
their expiry, workers SIGKILLed meanwhile (SQLite and PostgreSQL); and two separate
gunicorn masters on one PostgreSQL (two hosts behind a load balancer), one of them killed
and restarted mid-study. Afterwards every acknowledged vote is stored exactly once, no
refused vote is stored, and no item has more than K votes."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

import pytest
import requests
from sqlalchemy import func, select

from study_app.commands import make_app
from study_app.extensions import db
from study_app.models import Item, Participant, Trial, Vote
from tests.study_support import make_study, vote_body, write_stimulus_set
from tests.support import free_port, gunicorn_workers, start_gunicorn, stop_gunicorn

K = 2
PARTICIPANTS = 16
RUN_S = 20.0
KILL_EVERY_ANSWERS = 4
CRASH_AFTER_ANSWERS = 10


@dataclass
class Outcome:
    """What the participants were told: votes acknowledged (200) and refused (410)."""

    acknowledged: list[tuple[str, str]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class LoadBalanced:
    """A participant's HTTP calls spread over ``bases`` (a random one per call, as a load
    balancer would); a connection error or a 5xx/429 is retried, on any base, until a
    definitive answer: so a vote whose answer was lost with a killed worker is sent again
    (and answered as a replay)."""

    def __init__(self, bases: list[str], rng: random.Random):
        self.bases, self.rng, self.session = bases, rng, requests.Session()

    def post(self, path: str, deadline: float, **kwargs) -> requests.Response:
        while time.monotonic() < deadline + 30:
            try:
                response = self.session.post(self.rng.choice(self.bases) + path, timeout=10,
                                             **kwargs)
            except requests.RequestException:
                time.sleep(0.05)
                continue
            if response.status_code < 500 and response.status_code != 429:
                return response
            time.sleep(0.05)
        raise AssertionError(f"no definitive answer to {path} within 30 s after the run")


def _expires(trial: dict) -> float:
    return datetime.fromisoformat(trial["expires_at"].replace("Z", "+00:00")).timestamp()


def participate(bases: list[str], slug: str, seed: int, deadline: float,
                outcome: Outcome) -> None:
    """Start, then fetch and answer each trial within ±40 ms of its lease's expiry."""
    rng = random.Random(seed)
    client = LoadBalanced(bases, rng)
    started = client.post(f"/api/v1/studies/{slug}/participants", deadline,
                          json={"prolific_pid": f"lease{seed}"})
    assert started.status_code in (200, 201), started.text
    headers = {"Authorization": "Bearer " + started.json()["participant"]["token"]}
    while time.monotonic() < deadline:
        asked = client.post("/api/v1/participant/trials/next", deadline, headers=headers, json={})
        assert asked.status_code == 200, asked.text
        body = asked.json()
        if body["done"]:
            return
        if not body["trials"]:
            time.sleep(rng.uniform(0.0, 0.1))
            continue
        for trial in body["trials"]:
            time.sleep(max(0.0, _expires(trial) + rng.uniform(-0.04, 0.01) - time.time()))
            choice = rng.choice(["left", "right"])
            response = client.post("/api/v1/participant/votes", deadline, headers=headers,
                                   json=vote_body(trial["token"], choice))
            with outcome.lock:
                if response.status_code == 200:
                    outcome.acknowledged.append((trial["token"], choice))
                elif response.status_code == 410:
                    outcome.refused.append(trial["token"])
                else:
                    outcome.errors.append(f"{response.status_code} {response.text}")


def run_participants(bases: list[str], slug: str, outcome: Outcome) -> None:
    deadline = time.monotonic() + RUN_S
    threads = [threading.Thread(target=participate, args=(bases, slug, i, deadline, outcome))
               for i in range(PARTICIPANTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=RUN_S + 90)
    assert not any(thread.is_alive() for thread in threads), "a participant hung"


def check_votes(app, outcome: Outcome) -> None:
    print(f"acknowledged {len(outcome.acknowledged)}, refused (lease expired) "
          f"{len(outcome.refused)}")
    assert outcome.errors == []
    assert outcome.acknowledged and outcome.refused, \
        "no answer straddled an expiry: the run tested nothing"
    with app.app_context():
        stored = db.session.execute(select(Trial.token, Vote.choice).join(Vote)).all()
        assert Counter(stored) == Counter(outcome.acknowledged)  # each exactly once
        assert not {token for token, _ in stored} & set(outcome.refused)
        per_item = Counter(db.session.scalars(
            select(Trial.item_id).join(Vote).where(Trial.kind == "main")))
        assert max(per_item.values()) <= K, f"items over K: {per_item}"
        assert dict(db.session.execute(select(Item.id, Item.n_votes)
                                       .where(Item.n_votes > 0)).all()) == dict(per_item)
        assert db.session.scalar(select(func.sum(Participant.n_answered))) == len(stored)
        db.engine.dispose()


def short_lease_study(database_url: str, tmp_path) -> tuple:
    app = make_app(database_url)  # migrations up to head
    slug = make_study(app, write_stimulus_set(tmp_path / "set", n_images=4),
                      votes_per_item=K, trials_per_participant=12, catch_trials=0,
                      repeat_trials=0, batch_size=2, lease_seconds=1, seed=7)
    with app.app_context():
        db.engine.dispose()
    return app, slug


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_short_leases_and_killed_workers_never_exceed_k(any_database_url, tmp_path):
    app, slug = short_lease_study(any_database_url, tmp_path)
    server, base = start_gunicorn(any_database_url, tmp_path)
    killed: list[int] = []
    stop = threading.Event()

    outcome = Outcome()

    def killer() -> None:
        """Kill a worker every ``KILL_EVERY_ANSWERS`` answers (acknowledged or refused):
        paced by the traffic, not the clock, so a fast machine that finishes the study in
        a few seconds still sees workers die mid-study."""
        rng = random.Random(3)
        answers_at_last_kill = -KILL_EVERY_ANSWERS
        while not stop.wait(0.05):
            with outcome.lock:
                answers = len(outcome.acknowledged) + len(outcome.refused)
            if answers - answers_at_last_kill < KILL_EVERY_ANSWERS:
                continue
            workers = gunicorn_workers(server.pid)
            if len(workers) >= 2:
                victim = rng.choice(workers)
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)
                answers_at_last_kill = answers

    thread = threading.Thread(target=killer, daemon=True)
    try:
        thread.start()
        run_participants([base], slug, outcome)
    finally:
        stop.set()
        thread.join(timeout=10)
        stop_gunicorn(server)
    print(f"killed {len(killed)} workers")
    assert len(killed) >= 3, f"only {len(killed)} workers were killed during the run"
    check_votes(app, outcome)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(300)
def test_two_gunicorn_masters_on_one_postgresql_one_killed_and_restarted(postgres_url, tmp_path):
    """Two app hosts (two gunicorn masters) share one PostgreSQL; every call goes to
    either. Mid-study one host dies whole (master and workers SIGKILLed) and comes back
    on the same port 2 s later."""
    app, slug = short_lease_study(postgres_url, tmp_path)
    port_a = free_port()
    host_a, base_a = start_gunicorn(postgres_url, tmp_path, port=port_a, workers=2)
    host_b, base_b = start_gunicorn(postgres_url, tmp_path, workers=2)
    restarted: list = []
    stop = threading.Event()
    outcome = Outcome()

    def crash_and_restart() -> None:
        """Host A dies once ``CRASH_AFTER_ANSWERS`` answers are in (paced by the traffic,
        not the clock, so it happens mid-study on a machine of any speed)."""
        while True:
            if stop.wait(0.05):
                return
            with outcome.lock:
                if len(outcome.acknowledged) + len(outcome.refused) >= CRASH_AFTER_ANSWERS:
                    break
        for pid in [*gunicorn_workers(host_a.pid), host_a.pid]:
            os.kill(pid, signal.SIGKILL)
        host_a.wait(timeout=10)
        if stop.wait(2.0):
            return
        restarted.append(start_gunicorn(postgres_url, tmp_path, port=port_a, workers=2)[0])

    thread = threading.Thread(target=crash_and_restart, daemon=True)
    try:
        thread.start()
        run_participants([base_a, base_b], slug, outcome)
        thread.join(timeout=90)
    finally:
        stop.set()
        for server in (host_a, host_b, *restarted):
            stop_gunicorn(server)
    assert host_a.returncode == -signal.SIGKILL and restarted, "host A was not killed and restarted"
    check_votes(app, outcome)
