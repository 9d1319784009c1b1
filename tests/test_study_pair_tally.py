"""The per-pair tallies (``pair_tally``, kept by triggers on ``item``) on SQLite and
PostgreSQL: equal to grouping every item and every vote after concurrent participants
voted through the API (both hot paths and the ORM path), after a study is deleted, and
after migration 0009 fills them for votes stored before it existed."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
from sqlalchemy import delete, select

from study_app.extensions import db
from study_app.models import Item, PairTally, Participant, Study, Trial, Vote
from tests.study_support import Participant as ApiParticipant
from tests.study_support import make_study, vote_body, write_stimulus_set

CONDITIONS = ("a", "b", "c", "d")


def _study(app, tmp_path, design: str = "balanced") -> str:
    stimuli = write_stimulus_set(tmp_path / "set", n_images=4, conditions=CONDITIONS, size=4)
    return make_study(app, stimuli, design=design, votes_per_item=3, trials_per_participant=10,
                      catch_trials=1, repeat_trials=1, posterior_every=3)


def _vote_concurrently(app, slug: str, participants: int, seed: int) -> None:
    """``participants`` threads start at once and answer their whole share, by a random
    choice."""
    from tests.test_study_active import _together

    def participate(i: int) -> None:
        rng = np.random.default_rng([seed, i])
        ApiParticipant(app.test_client(), slug).complete(
            lambda trial: "left" if rng.random() < 0.5 else "right")

    _together(participants, participate)


def _tally() -> dict:
    """``{(study, a, b, level): (items, a_wins)}`` from pair_tally, empty rows left out."""
    return {
        (r.study_id, r.condition_a_id, r.condition_b_id, r.n_votes): (r.n_items, r.a_wins)
        for r in db.session.scalars(select(PairTally).where(PairTally.n_items != 0))
    }


def _grouped() -> dict:
    """The same numbers from every item, with each item's wins for a counted from its votes
    (main, not preview, the side condition a was shown on)."""
    wins: dict[int, int] = defaultdict(int)
    rows = db.session.execute(
        select(Trial.item_id, Trial.a_left, Vote.choice)
        .join(Vote, Vote.trial_id == Trial.id)
        .where(Trial.kind == "main", Trial.preview.is_(False))
    ).all()
    for item_id, a_left, choice in rows:
        wins[item_id] += int((choice == "left") == a_left)
    out: dict = defaultdict(lambda: [0, 0])
    for item in db.session.scalars(select(Item)):
        assert item.n_a_wins == wins[item.id]
        entry = out[(item.study_id, item.condition_a_id, item.condition_b_id, item.n_votes)]
        entry[0] += 1
        entry[1] += wins[item.id]
    return {key: tuple(value) for key, value in out.items()}


def test_the_tallies_equal_grouping_every_item_and_vote(db_app, tmp_path):
    slug = _study(db_app, tmp_path, design="active")
    with db_app.app_context():
        assert _tally() == _grouped()  # the new study: every item at level 0, no wins
    _vote_concurrently(db_app, slug, participants=6, seed=1)
    with db_app.app_context():
        # the ORM path of a vote (the one that answers replays and errors precisely)
        from study_app import scheduling
        from study_app.api import parse_vote
        from study_app.studies import study_config

        person = ApiParticipant(db_app.test_client(), slug)
        token = person.next().get_json()["trials"][0]["token"]
        participant = db.session.scalars(
            select(Participant).order_by(Participant.id.desc())).first()
        study = db.session.scalars(select(Study).where(Study.slug == slug)).one()
        vote = parse_vote(vote_body(token, "right"))
        scheduling.record_vote(participant.id, study, vote, study_config(study).reference_shown)
        db.session.commit()
        tally, grouped = _tally(), _grouped()
        assert tally == grouped
        votes = sum(level * items for (_, _, _, level), (items, _) in tally.items())
        assert votes == db.session.scalar(
            select(db.func.count(Vote.id)).join(Trial).where(Trial.kind == "main")) > 20
        assert sum(wins for _, wins in tally.values()) > 0


def test_deleted_items_leave_their_levels(db_app, tmp_path):
    """The delete trigger: items removed (votes and all) leave the tallies equal to
    grouping what remains."""
    slug = _study(db_app, tmp_path)
    _vote_concurrently(db_app, slug, participants=2, seed=2)
    with db_app.app_context():
        before = _tally()
        voted = db.session.scalars(select(Item.id).where(Item.n_votes > 0).limit(3)).all()
        assert len(voted) == 3
        trials = select(Trial.id).where(Trial.item_id.in_(voted))
        db.session.execute(delete(Vote).where(Vote.trial_id.in_(trials)))
        db.session.execute(delete(Trial).where(Trial.item_id.in_(voted)))
        db.session.execute(delete(Item).where(Item.id.in_(voted)))
        db.session.commit()
        assert _tally() == _grouped() != before


def _voted_then_down_to_0008(app, tmp_path, participants: int, seed: int) -> tuple[str, dict]:
    """A study voted on by ``participants``, then the database taken down to revision
    0008 (no tallies, no n_a_wins); returns the slug and the tallies the triggers kept."""
    from flask_migrate import downgrade
    from sqlalchemy import inspect

    slug = _study(app, tmp_path)
    _vote_concurrently(app, slug, participants=participants, seed=seed)
    with app.app_context():
        kept = _tally()
        db.session.remove()
        downgrade(revision="0008_scheduling_load")
        assert "pair_tally" not in inspect(db.engine).get_table_names()
    return slug, kept


def test_the_tally_migration_fills_what_the_triggers_keep(db_app, tmp_path):
    """Down to 0008 (no tallies, no n_a_wins) and up again: the migration's fill from the
    stored items and votes equals what the triggers kept while the votes came in, and the
    triggers work again afterwards."""
    from flask_migrate import upgrade

    slug, kept = _voted_then_down_to_0008(db_app, tmp_path, participants=4, seed=3)
    with db_app.app_context():
        upgrade()
        db.session.remove()
        assert _tally() == kept == _grouped()
    ApiParticipant(db_app.test_client(), slug).complete(lambda trial: "right")
    with db_app.app_context():
        assert _tally() == _grouped() != kept


def test_a_database_made_by_create_all_before_the_tallies_is_migrated(db_app, tmp_path):
    """A database at revision 0008 without alembic_version (as ``db.create_all()`` of that
    version leaves it), with votes: ``upgrade_database`` migrates it (not just a stamp),
    so the tallies are filled, the triggers exist and the schema matches the models."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import inspect

    from study_app.commands import upgrade_database
    from study_app.models import PAIR_TALLY_TRIGGER_NAMES
    from tests.test_study_migrations import _triggers

    _slug, kept = _voted_then_down_to_0008(db_app, tmp_path, participants=3, seed=4)
    with db_app.app_context():
        with db.engine.begin() as connection:
            connection.exec_driver_sql("DROP TABLE alembic_version")
    upgrade_database(db_app)
    with db_app.app_context():
        assert _tally() == kept == _grouped()
        with db.engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, db.metadata) == []
        assert _triggers(db.engine) == PAIR_TALLY_TRIGGER_NAMES[db.engine.dialect.name]
        assert "alembic_version" in inspect(db.engine).get_table_names()


@pytest.mark.parametrize("choice, a_left, expected", [
    ("left", True, True), ("right", True, False), ("left", False, False),
    ("right", False, True), ("same", True, False), ("different", False, False),
    ("left", None, False),
])
def test_chose_a_reads_the_side_condition_a_was_shown_on(choice, a_left, expected):
    from study_app.scheduling import chose_a

    assert chose_a(choice, a_left) is expected
