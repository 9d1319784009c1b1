"""Benchmark: the latency of ``trials/next`` in a balanced and an active study, in-process.

    python bench/bench_next_latency.py [--conditions 16] [--images 500] [--participants 30]
                                       [--rounds 5] [--database sqlite|postgres]
                                       [--holding 0]

One study per design (SQLite file, or a database of a throwaway PostgreSQL server) (all pairs of the conditions × every image, K = 3, M = 20,
no catch or repeat trials, posterior recomputed every 20 votes), then participants take
turns: fetch (timed; Flask's test client, no HTTP server, so this is the server's own
work) and answer their batch. Prints p50 / p99 / max per design. Not the concurrent
gunicorn load of ``bench/bench_votes.py``: one request at a time. ``--holding N``: each
batch is answered only after N more fetches (N participants hold their 4 open leases
while the others fetch, as in a live study; N < participants), so the reads that grow with
a study's open leases show.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(
    design: str, conditions: int, images: int, participants: int, rounds: int, root: Path,
    database_url: str | None = None, holding: int = 0,
) -> np.ndarray:
    """Seconds per ``next`` call for one study of ``design`` (on ``database_url``, an
    empty database; default a SQLite file under ``root``); ``holding``: batches left
    unanswered until that many later fetches."""
    from flask_migrate import upgrade

    from study_app import create_app
    from tests.study_support import Participant, make_study, write_stimulus_set

    names = tuple(f"c{i:02d}" for i in range(conditions))
    stimuli = write_stimulus_set(root / f"set-{design}", n_images=images, conditions=names, size=4)
    app = create_app(
        {
            "TESTING": True,
            "PARTICIPANT_RATE_LIMIT": (10**6, 60.0),
            "SQLALCHEMY_DATABASE_URI": database_url or f"sqlite:///{root / design}.sqlite3",
        }
    )
    with app.app_context():
        upgrade()
    slug = make_study(
        app,
        stimuli,
        design=design,
        votes_per_item=3,
        trials_per_participant=20,
        catch_trials=0,
        repeat_trials=0,
        posterior_every=20,
    )
    client = app.test_client()
    people = [Participant(client, slug) for _ in range(participants)]
    rng = np.random.default_rng(0)
    seconds = []
    pending: list[tuple] = []  # (participant, trials) fetched, not yet answered
    for _ in range(rounds):
        for person in people:
            start = time.perf_counter()
            body = person.next().get_json()
            seconds.append(time.perf_counter() - start)
            pending.append((person, body["trials"]))
            while len(pending) > holding:
                who, trials = pending.pop(0)
                for trial in trials:
                    who.vote(trial["token"], "left" if rng.random() < 0.5 else "right")
    return np.array(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conditions", type=int, default=16)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--participants", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--holding", type=int, default=0,
                        help="participants holding unanswered batches (< --participants)")
    args = parser.parse_args(argv)
    if args.conditions < 2 or min(args.images, args.participants, args.rounds) < 1:
        parser.error("--conditions must be >= 2 and --images/--participants/--rounds >= 1")
    if not 0 <= args.holding < args.participants:
        parser.error("--holding must be >= 0 and less than --participants (those who hold "
                     "their batch cannot fetch again before answering it)")
    logging.disable(logging.INFO)  # Alembic's migration log
    items = args.images * args.conditions * (args.conditions - 1) // 2
    print(
        f"{args.conditions} conditions × {args.images} images = {items} items, "
        f"{args.participants} participants × {args.rounds} fetches, {args.database}, in-process"
        + (f", {args.holding} holding their batch" if args.holding else "")
    )
    with tempfile.TemporaryDirectory() as tmp:
        for design in ("balanced", "active"):
            url, stop = None, lambda: None
            if args.database == "postgres":  # a fresh server per design
                from bench_votes import start_postgres

                url, stop, _pid = start_postgres()
            try:
                ms = 1000 * measure(
                    design, args.conditions, args.images, args.participants, args.rounds,
                    Path(tmp), url, args.holding,
                )
            finally:
                stop()
            print(
                f"{design:<9} next: p50 {np.percentile(ms, 50):6.1f} ms  "
                f"p99 {np.percentile(ms, 99):6.1f} ms  max {ms.max():6.1f} ms"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
