"""The active design live in the study server, on SQLite and PostgreSQL: the shared
posterior, caps and "never the same item twice" under concurrent participants, the
information gain stored and exported, the stopping rule closing main trials once, and a
simulated active study that recovers the true order of the conditions."""

from __future__ import annotations

import io
import threading
from collections import Counter
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest
from scipy import special
from sqlalchemy import func, select

from study_app.extensions import db
from study_app.models import Item, Participant, Study, StudyPosterior, Trial, Vote
from study_app.studies import StudyConfigError, parse_config
from tests.study_support import Participant as ApiParticipant
from tests.study_support import make_study, write_stimulus_set

TRUE_JOD = {"a": 0.0, "b": 1.0, "c": 2.0, "d": 3.0}


def _observer(app, rng: np.random.Generator):
    """A simulated participant's choice: Thurstone Case V on TRUE_JOD (reads the trial's
    conditions from the database; the API keeps them blind)."""

    def choose(trial: dict) -> str:
        with app.app_context():
            row = db.session.scalars(select(Trial).where(Trial.token == trial["token"])).one()
            left, right = row.condition_left, row.condition_right
        if "reference" in (left, right):  # a catch trial: the reference is the answer
            return "left" if left == "reference" else "right"
        p_left = special.ndtr((TRUE_JOD[left] - TRUE_JOD[right]) / 1.4826)
        return "left" if rng.random() < p_left else "right"

    return choose


def _together(n: int, participate) -> None:
    """Run ``participate(i)`` for i < n in threads started at once; re-raise any error."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            participate(i)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors


def _active_study(app, tmp_path, **config) -> str:
    settings = {
        "design": "active",
        "votes_per_item": 3,
        "trials_per_participant": 8,
        "catch_trials": 0,
        "repeat_trials": 0,
        "posterior_every": 4,
        **config,
    }
    return make_study(
        app,
        write_stimulus_set(tmp_path / "set", n_images=3, conditions=tuple(TRUE_JOD)),
        **settings,
    )


def test_bad_active_settings_are_refused_with_the_field_named():
    base = {"title": "t", "slug": "tt"}
    for bad, field in (
        ({"design": "adaptive"}, "'design'"),
        ({"pair_floor": -1}, "pair_floor"),
        ({"design": "active", "stop_half_width": 0}, "stop_half_width"),
        ({"design": "active", "vote_budget": 0}, "vote_budget"),
        ({"posterior_every": 0}, "posterior_every"),
        ({"stop_half_width": 0.2}, "need design: active"),
    ):
        with pytest.raises(StudyConfigError, match=field):
            parse_config({**base, **bad})
    assert parse_config(base).design == "balanced"


def test_an_active_study_keeps_k_never_repeats_an_item_and_records_its_gains(db_app, tmp_path):
    slug = _active_study(db_app, tmp_path)
    rng = np.random.default_rng(0)
    for _ in range(4):
        ApiParticipant(db_app.test_client(), slug).complete(_observer(db_app, rng))
    with db_app.app_context():
        main = db.session.scalars(select(Trial).where(Trial.kind == "main")).all()
        per_participant = Counter((t.participant_id, t.item_id) for t in main)
        assert max(per_participant.values()) == 1  # never the same item twice
        votes = Counter(
            db.session.scalars(select(Trial.item_id).join(Vote).where(Trial.kind == "main"))
        )
        assert max(votes.values()) <= 3  # K is the cap
        assert dict(
            db.session.execute(select(Item.id, Item.n_votes).where(Item.n_votes > 0)).all()
        ) == dict(votes)
        assert all(t.info_gain is not None and t.info_gain >= 0 for t in main)
        total = sum(votes.values())
        behind = total - db.session.scalars(select(StudyPosterior.n_votes)).one()
    assert 0 <= behind < 4 + 4  # recomputed at a lease, at most posterior_every behind
    ApiParticipant(db_app.test_client(), slug).next()  # recomputes when >= 4 votes behind
    from analysis.active import Posterior, thurstone_posterior
    from analysis.scaling import win_matrix
    from study_app.export import read_responses

    frame = read_responses(db_app.config["SQLALCHEMY_DATABASE_URI"], slug)
    assert frame["info_gain"].notna().all() and (frame["info_gain"] >= 0).all()
    with db_app.app_context():
        row = db.session.scalars(select(StudyPosterior)).one()
        stored = Posterior.from_dict(row.posterior)
    if behind >= 4:
        assert row.n_votes == total == len(frame)
        expected = thurstone_posterior(win_matrix(frame, sorted(TRUE_JOD)))
        np.testing.assert_allclose(stored.mean, expected.mean, atol=1e-6)
        np.testing.assert_allclose(stored.cov, expected.cov, atol=1e-6)


def test_concurrent_participants_never_lease_past_the_vote_budget(db_app, tmp_path):
    """10 participants fetch and answer at once under a budget of 15 main votes: exactly
    15 main votes are stored and main trials are closed once."""
    slug = _active_study(db_app, tmp_path, vote_budget=15, trials_per_participant=6, batch_size=3)
    people = [ApiParticipant(db_app.test_client(), slug) for _ in range(10)]
    _together(10, lambda i: people[i].complete())
    with db_app.app_context():
        main = db.session.scalar(
            select(func.count(Vote.id)).join(Trial).where(Trial.kind == "main")
        )
        assert main == 15
        assert (
            db.session.scalars(select(Study.main_closed_reason))
            .one()
            .startswith("vote budget reached")
        )


def test_concurrent_active_participants_never_pass_k_and_spread_over_pairs(db_app, tmp_path):
    """12 participants fetch at once, again and again: every vote stored once, no item
    beyond K, and the first simultaneous fetches do not all get the same pair."""
    slug = _active_study(
        db_app, tmp_path, votes_per_item=2, trials_per_participant=6, batch_size=2, pair_floor=0
    )
    acknowledged: list[str] = []
    first_round: list[str] = []
    people = [ApiParticipant(db_app.test_client(), slug) for _ in range(12)]

    def participate(i: int) -> None:
        first = True
        while True:
            body = people[i].next().get_json()
            if body["done"]:
                return
            for trial in body["trials"]:
                if first:
                    first_round.append(trial["token"])
                response = people[i].vote(trial["token"], "left" if i % 2 else "right")
                assert response.status_code == 200, response.get_json()
                acknowledged.append(trial["token"])
            first = False

    _together(12, participate)
    with db_app.app_context():
        stored = list(db.session.scalars(select(Trial.token).join(Vote)))
        assert Counter(stored) == Counter(acknowledged)
        per_item = Counter(
            db.session.scalars(select(Trial.item_id).join(Vote).where(Trial.kind == "main"))
        )
        assert max(per_item.values()) <= 2
        assert db.session.scalar(select(func.sum(Item.n_votes))) == len(stored)
        pairs = Counter(
            db.session.execute(
                select(Item.condition_a_id, Item.condition_b_id)
                .join(Trial, Trial.item_id == Item.id)
                .where(Trial.token.in_(first_round))
            ).all()
        )
        assert len(pairs) >= 3, pairs  # 24 first leases of 6 pairs, spread


def test_the_vote_budget_stops_main_trials_once_and_the_dashboard_says_why(db_app, tmp_path):
    slug = _active_study(db_app, tmp_path, vote_budget=10, trials_per_participant=8, catch_trials=1)
    rng = np.random.default_rng(1)
    answered = [
        ApiParticipant(db_app.test_client(), slug).complete(_observer(db_app, rng))
        for _ in range(3)
    ]
    with db_app.app_context():
        study = db.session.scalars(select(Study)).one()
        main = db.session.scalar(
            select(func.count(Vote.id)).join(Trial).where(Trial.kind == "main")
        )
        assert main == 10  # the budget, not one vote more
        assert study.main_closed_at is not None
        assert "vote budget reached" in study.main_closed_reason
        closed_at = study.main_closed_at
    assert answered[0] == 9 and sum(answered) == 10 + 3  # catch trials still shown
    # a later participant gets no main trial; the closing time never changes
    late = ApiParticipant(db_app.test_client(), slug)
    assert late.complete(_observer(db_app, rng)) == 1
    with db_app.app_context():
        assert db.session.scalars(select(Study)).one().main_closed_at == closed_at
        from study_app.researcher import dashboard_data

        data = dashboard_data(db.session.scalars(select(Study)).one())
    assert data["active"]["closed_reason"].startswith("vote budget reached")
    assert data["active"]["predicted_remaining"] == 0
    assert len(data["active"]["conditions"]) == 4


def test_the_stopping_rule_closes_exactly_once_under_concurrent_checks(db_app, tmp_path):
    """Eight transactions judge the same met precision target at once: one closes."""
    from analysis.active import thurstone_posterior
    from study_app.active import check_stopping_rule
    from study_app.studies import study_config
    from study_app.transactions import run_write

    slug = _active_study(db_app, tmp_path, stop_half_width=6.0)
    posterior = thurstone_posterior(np.full((4, 4), 50.0) - np.diag([50.0] * 4))
    barrier = threading.Barrier(8)
    results: list[bool] = []

    def check() -> None:
        with db_app.app_context():
            study = db.session.scalars(select(Study).where(Study.slug == slug)).one()
            study_id, config = study.id, study_config(study)
            db.session.rollback()
            barrier.wait()
            results.append(
                run_write(
                    lambda: check_stopping_rule(
                        db.session.get(Study, study_id),
                        config,
                        posterior,
                        posterior.n_votes,
                        datetime.now(UTC),
                    )
                )
            )

    threads = [threading.Thread(target=check) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(results) == [False] * 7 + [True]
    with db_app.app_context():
        reason = db.session.scalars(select(Study.main_closed_reason)).one()
    assert reason.startswith("precision target met")


def test_a_simulated_active_study_recovers_the_true_order(app, tmp_path):
    """SQLite, 30 participants × 10 main trials of a 4-condition active study (true
    scale 0, 1, 2, 3 JOD): the Thurstone scale fitted from the export (analysis, not the
    server's posterior) orders the conditions correctly; pairs far apart got fewer votes
    than their balanced share, and every pair its floor."""
    from analysis.scaling import fit_scale, win_matrix
    from study_app.export import write_csv

    slug = _active_study(
        app,
        tmp_path,
        votes_per_item=40,
        trials_per_participant=10,
        posterior_every=10,
        pair_floor=3,
    )
    rng = np.random.default_rng(7)
    for _ in range(30):
        ApiParticipant(app.test_client(), slug).complete(_observer(app, rng))
    buffer = io.StringIO()
    with app.app_context(), db.engine.connect() as connection:
        write_csv(connection, slug, buffer)
        assert db.session.scalar(select(func.count(Participant.id))) == 30
    frame = pd.read_csv(io.StringIO(buffer.getvalue()))
    assert len(frame) == 300
    names = sorted(TRUE_JOD)
    scale = fit_scale(win_matrix(frame, names), "thurstone", 1 / 9)
    assert list(np.argsort(scale)) == [0, 1, 2, 3], scale
    pair_votes = Counter(
        frozenset(p) for p in zip(frame.condition_left, frame.condition_right, strict=True)
    )
    assert min(pair_votes.values()) >= 3
    assert pair_votes[frozenset("ad")] < 300 / 6, pair_votes  # 3 JOD apart: fewer votes


def test_pstudy_study_create_makes_an_active_study_and_names_a_bad_setting(tmp_path):
    from click.testing import CliRunner

    from study_app.cli import main

    url = ["--database-url", f"sqlite:///{tmp_path / 'cli.sqlite3'}"]
    root = write_stimulus_set(tmp_path / "set", conditions=tuple(TRUE_JOD))
    runner = CliRunner()
    made = runner.invoke(
        main,
        [
            "study",
            "create",
            str(root),
            "--slug",
            "act",
            "--design",
            "active",
            "--stop-half-width",
            "0.2",
            "-k",
            "3",
            *url,
        ],
    )
    assert made.exit_code == 0, made.output
    assert "active design" in made.output and "half-width <= 0.2 JOD" in made.output
    bad = runner.invoke(
        main, ["study", "create", str(root), "--slug", "bad", "--stop-half-width", "0.2", *url]
    )
    assert bad.exit_code == 1 and "need design: active" in bad.output
    assert "Traceback" not in bad.output


def test_the_analysis_report_notes_an_adaptive_design():
    from analysis.report import adaptive_design_note

    assert adaptive_design_note(None) is None
    assert adaptive_design_note({"study_config": {"design": "balanced"}}) is None
    note = adaptive_design_note({"study_config": {"design": "active"}})
    assert "chosen adaptively" in note and "info_gain" in note


def test_a_worker_parses_the_stored_posterior_once_and_sees_another_workers_update(
        db_app, tmp_path):
    """``active.stored_posterior`` keeps the parsed row per process while the row's version
    (votes, computed_at) stands, read-only; an update stored by another process (here a
    plain UPDATE) is read and parsed on the next call."""
    from analysis.active import Posterior
    from study_app import active

    slug = _active_study(db_app, tmp_path)
    with db_app.app_context():
        study = db.session.scalars(select(Study).where(Study.slug == slug)).one()
        votes, first, ids = active.stored_posterior(study)
        assert votes == 0 and ids == active.study_condition_ids(study)
        assert active.stored_posterior(study)[1] is first  # not parsed again
        assert not first.mean.flags.writeable and not first.cov.flags.writeable
        changed = Posterior(np.arange(4.0), np.eye(4) * 0.5, 12)
        db.session.execute(
            StudyPosterior.__table__.update().where(StudyPosterior.study_id == study.id)
            .values(n_votes=12, posterior=changed.to_dict(),
                    computed_at=datetime(2026, 12, 5, tzinfo=UTC)))
        db.session.commit()
        votes, second, _ = active.stored_posterior(study)
        assert votes == 12 and second is not first
        np.testing.assert_array_equal(second.mean, changed.mean)
        np.testing.assert_array_equal(second.cov, changed.cov)
