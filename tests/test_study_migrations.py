"""Alembic migrations: up from an empty database, the result equals the models, and back
down, on SQLite and on PostgreSQL (through Flask-Migrate, as `flask db upgrade` runs)."""

from __future__ import annotations

import logging
import subprocess
import sys
from datetime import datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData, inspect, select

from study_app import create_app
from study_app.extensions import db
from study_app.models import PAIR_TALLY_TRIGGER_NAMES

TABLES = {"researcher", "researcher_login", "login_failure", "stimulus_set", "condition", "image",
          "stimulus", "study", "study_collaborator", "item", "participant", "trial", "vote",
          "study_posterior", "pair_tally"}


def _round_trip(url: str) -> None:
    from flask_migrate import downgrade, upgrade

    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": url})
    with app.app_context():
        upgrade()
        assert TABLES <= set(inspect(db.engine).get_table_names())
        with db.engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            differences = compare_metadata(context, db.metadata)
        assert differences == [], f"models and migrations differ: {differences}"
        assert _triggers(db.engine) == PAIR_TALLY_TRIGGER_NAMES[db.engine.dialect.name]
        downgrade(revision="base")
        assert _triggers(db.engine) == set()
        assert set(inspect(db.engine).get_table_names()) <= {"alembic_version"}
        upgrade()
        assert TABLES <= set(inspect(db.engine).get_table_names())
        db.engine.dispose()


def _triggers(engine) -> set[str]:
    """The names of the database's own triggers."""
    query = ("SELECT name FROM sqlite_master WHERE type = 'trigger'"
             if engine.dialect.name == "sqlite"
             else "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")
    with engine.connect() as connection:
        return set(connection.exec_driver_sql(query).scalars())


def test_create_all_makes_the_triggers_the_migrations_make(any_database_url):
    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": any_database_url})
    with app.app_context():
        db.create_all()
        assert _triggers(db.engine) == PAIR_TALLY_TRIGGER_NAMES[db.engine.dialect.name]
        db.engine.dispose()


def test_migrations_up_match_models_and_down_on_sqlite(tmp_path):
    _round_trip(f"sqlite:///{tmp_path / 'migrate.sqlite3'}")


@pytest.mark.postgres
def test_migrations_up_match_models_and_down_on_postgres(postgres_url):
    _round_trip(postgres_url)


def test_flask_db_upgrade_command_runs_from_an_empty_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    env = {"DATABASE_URL": url, "PATH": "/usr/bin:/bin"}
    completed = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "study_app", "db", "upgrade"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    from sqlalchemy import create_engine

    engine = create_engine(url)
    assert TABLES | {"alembic_version"} == set(inspect(engine).get_table_names())
    engine.dispose()


def test_a_database_of_the_first_revision_is_upgraded_and_keeps_its_accounts(tmp_path):
    """An installation made before researcher logins were stored: the CLI's app brings
    it to head, the account survives and can log in."""
    from flask_migrate import upgrade

    from study_app.commands import make_app
    from study_app.models import Researcher
    from tests.test_pages_support import EMAIL, PASSWORD, login

    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    old = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": url})
    with old.app_context():
        upgrade(revision="0001_initial")
        assert "researcher_login" not in inspect(db.engine).get_table_names()
        with db.engine.begin() as connection:  # the table of that revision, not the model
            insert_rows(connection, "researcher", [researcher_row(EMAIL, PASSWORD)])
        db.engine.dispose()
    app = make_app(url)
    with app.app_context():
        assert "researcher_login" in inspect(db.engine).get_table_names()
        assert db.session.scalars(select(Researcher)).one().is_admin  # the only, oldest
    client = app.test_client()
    assert login(client).status_code == 302
    assert client.get("/researcher/").status_code == 200
    with app.app_context():
        db.engine.dispose()


def test_a_database_made_by_create_all_before_logins_gets_the_missing_table(tmp_path):
    from study_app.commands import upgrade_database
    from study_app.models import ResearcherLogin

    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'a.db'}"})
    with app.app_context():
        db.create_all()
        ResearcherLogin.__table__.drop(db.engine)
    upgrade_database(app)
    with app.app_context():
        tables = set(inspect(db.engine).get_table_names())
        assert TABLES | {"alembic_version"} == tables
        db.engine.dispose()


# --------------------------------------------------------------------------- owners (0003)


def researcher_row(email: str, password: str = "a long password", day: int = 1) -> dict:
    from werkzeug.security import generate_password_hash

    return {"email": email, "password_hash": generate_password_hash(password),
            "created_at": datetime(2026, 1, day, 12, 0)}


def insert_rows(connection, table: str, rows: list[dict]) -> list[int]:
    """Insert into the table as it is in the database (reflected); -> the new ids."""
    reflected = MetaData()
    reflected.reflect(connection, only=[table])
    return [connection.execute(reflected.tables[table].insert().values(**row)).inserted_primary_key[0]
            for row in rows]


def old_installation(connection, researchers: list[dict]) -> dict:
    """At revision 0002: the researchers, one stimulus set with a condition pair and an
    image, and two studies with an item and a participant each: 'web' created by the
    last researcher (created_by_id), 'cli' made on the command line (no creator)."""
    ids = insert_rows(connection, "researcher", researchers)
    now = datetime(2026, 2, 1, 9, 0)
    [set_id] = insert_rows(connection, "stimulus_set", [{
        "name": "old", "root": "/nowhere", "manifest": {}, "manifest_sha256": "0" * 64,
        "manifest_inferred": False, "image_height": 8, "image_width": 8, "channels": 3,
        "imported_at": now}])
    a, b = insert_rows(connection, "condition", [
        {"stimulus_set_id": set_id, "name": n, "info": {}} for n in ("a", "b")])
    [image] = insert_rows(connection, "image", [
        {"stimulus_set_id": set_id, "key": "i", "path": "reference/i.png", "sha256": "1" * 64}])
    studies = {}
    for slug, creator in (("web", ids[-1] if ids else None), ("cli", None)):
        [study_id] = insert_rows(connection, "study", [{
            "slug": slug, "title": slug, "stimulus_set_id": set_id, "status": "live",
            "config": {}, "config_sha256": "2" * 64, "created_by_id": creator,
            "created_at": now, "updated_at": now}])
        insert_rows(connection, "item", [{"study_id": study_id, "image_id": image,
                                          "condition_a_id": a, "condition_b_id": b,
                                          "n_votes": 3, "n_a_left": 1}])
        insert_rows(connection, "participant", [{
            "study_id": study_id, "public_id": f"p-{slug}", "token": f"t-{slug}",
            "status": "completed", "preview": False, "n_answered": 3, "n_issued": 3,
            "created_at": now}])
        studies[slug] = study_id
    return {"researchers": ids, "set": set_id, "studies": studies}


def counts(connection) -> dict[str, int]:
    from sqlalchemy import func, table

    return {name: connection.execute(select(func.count()).select_from(table(name))).scalar()
            for name in ("study", "item", "participant", "stimulus_set", "condition", "image")}


@pytest.mark.parametrize("researchers", [2, 0], ids=["with-researchers", "no-researcher"])
def test_the_owners_migration_assigns_existing_studies_and_keeps_every_row(
    any_database_url, researchers
):
    """From revision 0002 with data: the oldest researcher becomes admin; a study keeps
    its web creator as owner, the others go to the admin, and so do the stimulus sets.
    Rebuilding the tables on SQLite (batch mode) must not cascade-delete the items and
    participants that reference them. Without any researcher nothing gets an owner."""
    from flask_migrate import downgrade, upgrade

    from study_app.commands import make_app
    from study_app.models import Researcher, StimulusSet, Study

    old = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": any_database_url})
    with old.app_context():
        upgrade(revision="0002_researcher_login")
        with db.engine.begin() as connection:
            # the newer account first in id order: "oldest" goes by created_at
            made = old_installation(connection, [researcher_row("young@example.org", day=20),
                                                 researcher_row("old@example.org", day=2)]
                                    [:researchers])
            before = counts(connection)
        db.engine.dispose()

    app = make_app(any_database_url)  # what every pstudy command does first
    with app.app_context():
        with db.engine.connect() as connection:
            assert counts(connection) == before
        studies = {s.slug: s for s in db.session.scalars(select(Study))}
        stimulus_set = db.session.get(StimulusSet, made["set"])
        if researchers:
            young, oldest = made["researchers"]
            admins = db.session.scalars(select(Researcher.email).where(Researcher.is_admin)).all()
            assert admins == ["old@example.org"]
            assert studies["web"].owner_id == oldest  # created on the web by "old"
            assert studies["cli"].owner_id == oldest  # no creator: the admin
            assert stimulus_set.owner_id == oldest
        else:
            assert studies["web"].owner_id is None and studies["cli"].owner_id is None
            assert stimulus_set.owner_id is None
        db.session.remove()  # its open transaction would block ALTER TABLE on PostgreSQL
        # and back down, keeping the rows too
        downgrade(revision="0002_researcher_login")
        with db.engine.connect() as connection:
            assert counts(connection) == before
            assert "owner_id" not in {c["name"] for c in inspect(connection).get_columns("study")}
        db.session.remove()
        db.engine.dispose()


def test_the_owners_migration_keeps_a_web_creator_as_owner(tmp_path):
    """A study created on the web by a researcher who is not the oldest stays theirs:
    they see it and not the admin's study; the admin sees both."""
    from flask_migrate import upgrade

    from study_app.commands import make_app
    from tests.test_pages_support import login

    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    old = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": url})
    with old.app_context():
        upgrade(revision="0002_researcher_login")
        with db.engine.begin() as connection:
            old_installation(connection, [researcher_row("admin@example.org", "admin password", 1),
                                          researcher_row("bo@example.org", "bo's password", 5)])
        db.engine.dispose()
    app = make_app(url)
    bo, admin = app.test_client(), app.test_client()
    assert login(bo, "bo@example.org", "bo's password").status_code == 302
    assert login(admin, "admin@example.org", "admin password").status_code == 302
    # (config.json: these made-up studies have no real configuration for the dashboard)
    assert bo.get("/researcher/studies/web/config.json").status_code == 200
    assert bo.get("/researcher/studies/cli/config.json").status_code == 404
    assert admin.get("/researcher/studies/web/config.json").status_code == 200
    assert admin.get("/researcher/studies/cli/config.json").status_code == 200
    with app.app_context():
        db.engine.dispose()


def _made_at_then_upgraded(tmp_path, revision: str, email: str):
    """A SQLite database with the schema of ``revision`` and ``old_installation``'s rows
    but no alembic_version (as ``db.create_all()`` of that version leaves it), then
    brought up by ``upgrade_database``; returns the app on it."""
    from flask_migrate import upgrade

    from study_app.commands import upgrade_database

    url = f"sqlite:///{tmp_path / 'made.sqlite3'}"
    old = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": url})
    with old.app_context():
        upgrade(revision=revision)
        with db.engine.begin() as connection:
            old_installation(connection, [researcher_row(email)])
            connection.exec_driver_sql("DROP TABLE alembic_version")
        db.engine.dispose()
    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": url})
    upgrade_database(app)
    return app


def test_a_database_made_by_create_all_before_owners_is_migrated_not_stamped(tmp_path):
    """A database without alembic_version whose study table has no owner_id (made by
    db.create_all() of an older version) gets the migration, not just a stamp."""
    from study_app.models import Study

    app = _made_at_then_upgraded(tmp_path, "0002_researcher_login", "solo@example.org")
    with app.app_context():
        assert TABLES | {"alembic_version"} == set(inspect(db.engine).get_table_names())
        owners = {s.slug: s.owner.email for s in db.session.scalars(select(Study))}
        assert owners == {"web": "solo@example.org", "cli": "solo@example.org"}
        db.session.remove()
        db.engine.dispose()


def test_a_database_made_by_create_all_before_the_active_design_is_migrated(tmp_path):
    """Made by db.create_all() after owners but before the active design (no
    study.main_closed_at): migrated from revision 3, so the new columns and tables exist."""
    from flask_migrate import upgrade

    from study_app.commands import upgrade_database

    url = f"sqlite:///{tmp_path / 'made.sqlite3'}"
    old = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": url})
    with old.app_context():
        upgrade(revision="0003_owners_and_throttling")
        with db.engine.begin() as connection:
            connection.exec_driver_sql("DROP TABLE alembic_version")
        db.engine.dispose()
    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": url})
    upgrade_database(app)
    with app.app_context():
        inspector = inspect(db.engine)
        assert TABLES | {"alembic_version"} == set(inspector.get_table_names())
        assert "info_gain" in {c["name"] for c in inspector.get_columns("trial")}
        with db.engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, db.metadata) == []
        db.engine.dispose()


# ------------------------------------------------------------------ scheduling load (0007)


def test_the_scheduling_migration_fills_draw_keys_and_goes_back_down(any_database_url):
    """From revision 0007 (the one before) with studies: every existing item gets the draw key a new item
    of the same id gets ((id × 2654435761) mod 4294967311, computed here in Python), the
    load indexes exist, and the way back down keeps every row."""
    from flask_migrate import downgrade, upgrade

    from study_app.commands import make_app
    from study_app.models import DRAW_MOD, DRAW_MULT, Item

    old = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": any_database_url})
    with old.app_context():
        upgrade(revision="0007_display_calibration")
        with db.engine.begin() as connection:
            made = old_installation(connection, [researcher_row("keys@example.org")])
            before = counts(connection)
        db.engine.dispose()

    app = make_app(any_database_url)
    with app.app_context():
        with db.engine.connect() as connection:
            assert counts(connection) == before
            indexes = {i["name"] for i in inspect(connection).get_indexes("item")}
            assert {"ix_item_study_load", "ix_item_study_pair_load",
                    "ix_item_study_draw"} <= indexes
            assert "ix_item_study_pair" not in indexes
            trial_indexes = {i["name"] for i in inspect(connection).get_indexes("trial")}
            assert "ix_trial_study_open" in trial_indexes
        keys = dict(db.session.execute(select(Item.id, Item.draw_key)).all())
        assert len(keys) == len(made["studies"]) and keys
        assert keys == {i: (i * DRAW_MULT) % DRAW_MOD for i in keys}
        assert all(0 <= k < DRAW_MOD for k in keys.values())
        db.session.remove()
        downgrade(revision="0007_display_calibration")
        with db.engine.connect() as connection:
            assert counts(connection) == before
            assert "draw_key" not in {c["name"] for c in inspect(connection).get_columns("item")}
            indexes = {i["name"] for i in inspect(connection).get_indexes("item")}
            assert "ix_item_study_pair" in indexes and "ix_item_study_load" not in indexes
        db.session.remove()
        db.engine.dispose()


def test_a_new_study_gets_the_same_draw_keys_as_the_migration_gives(tmp_path):
    """Items created now carry the key the migration computes for existing ones, and the
    keys are spread (no two items of a study share one)."""
    from study_app.models import DRAW_MOD, DRAW_MULT, Item
    from tests.study_support import make_study, write_stimulus_set

    app = create_app({"TESTING": True,
                      "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'new.sqlite3'}"})
    with app.app_context():
        from flask_migrate import upgrade

        upgrade()
    stimuli = write_stimulus_set(tmp_path / "set", n_images=3, conditions=("a", "b", "c"), size=4)
    make_study(app, stimuli)
    with app.app_context():
        keys = dict(db.session.execute(select(Item.id, Item.draw_key)).all())
        assert len(keys) == 3 * 3
        assert keys == {i: (i * DRAW_MULT) % DRAW_MOD for i in keys}
        assert len(set(keys.values())) == len(keys)
        db.engine.dispose()


@pytest.mark.parametrize(
    "revision", ["0005_vote_exposure_timing", "0006_jnd_task", "0007_display_calibration"]
)
def test_a_database_made_by_create_all_before_draw_keys_is_migrated(tmp_path, revision):
    """Made by db.create_all() before the scheduling indexes (no item.draw_key), at any of
    the revisions before it: stamped at the revision its columns show and upgraded, so
    draw_key exists, is filled, and the schema matches the models."""
    from study_app.models import DRAW_MOD, DRAW_MULT

    app = _made_at_then_upgraded(tmp_path, revision, "made@example.org")
    with app.app_context():
        with db.engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, db.metadata) == []
            keys = connection.exec_driver_sql("SELECT id, draw_key FROM item").all()
        assert keys and all(k == (i * DRAW_MULT) % DRAW_MOD for i, k in keys)
        db.engine.dispose()


# ------------------------------------------------------------------- JND answers (0006)


def test_the_jnd_migration_goes_down_and_up_with_different_answers_stored(
    any_database_url, tmp_path, caplog
):
    """At head, a JND study's answers "same" and "different" and a 2AFC study's "left" /
    "right" are stored through the API; downgrading to 0005 (choice back to 5 characters)
    keeps every vote, stores "different" as "diff" and logs a warning; upgrading again (as
    every pstudy command does) gives back exactly the answers that were stored. Alembic
    runs quietly here, as in pstudy: its logging configuration would keep a handler on
    this test's captured stderr after the test."""
    from alembic import command

    from study_app.commands import upgrade_database
    from study_app.models import Vote
    from tests.study_support import Participant, make_study, write_stimulus_set

    app = create_app(
        {
            "TESTING": True,
            "SQLALCHEMY_DATABASE_URI": any_database_url,
            "PARTICIPANT_RATE_LIMIT": (10**6, 60.0),
        }
    )
    upgrade_database(app)
    stimuli = write_stimulus_set(tmp_path / "set", n_images=2)
    plain = {"practice_trials": 0, "catch_trials": 0, "repeat_trials": 0}
    jnd = make_study(app, stimuli, slug="jnd", task="jnd", **plain)
    two_afc = make_study(app, stimuli, slug="two-afc", **plain)
    client = app.test_client()
    answers = {jnd: ["different", "same", "different"], two_afc: ["left", "right", "left"]}
    for slug, chosen in answers.items():
        person = Participant(client, slug)
        for trial, choice in zip(person.next().get_json()["trials"], chosen, strict=False):
            assert person.vote(trial["token"], choice).status_code == 200

    def stored() -> dict[int, str]:
        with db.engine.connect() as connection:
            return dict(connection.execute(select(Vote.id, Vote.choice)).all())

    with app.app_context():
        before = stored()
        assert sorted(before.values()) == sorted(answers[jnd] + answers[two_afc])
        db.session.remove()
        config = app.extensions["migrate"].migrate.get_config()
        config.attributes["quiet"] = True
        with caplog.at_level(logging.WARNING, logger="alembic.versions.0006_jnd_task"):
            command.downgrade(config, "0005_vote_exposure_timing")
        [warning] = [r for r in caplog.records if r.name == "alembic.versions.0006_jnd_task"]
        assert warning.levelno == logging.WARNING
        assert warning.getMessage().startswith("2 JND answers 'different' stored as 'diff'")
        with db.engine.connect() as connection:
            column = {c["name"]: c for c in inspect(connection).get_columns("vote")}
            assert column["choice"]["type"].length == 5
            assert "isi_requested_ms" not in column
            down = dict(connection.exec_driver_sql("SELECT id, choice FROM vote").all())
        assert down == {i: "diff" if c == "different" else c for i, c in before.items()}
        db.engine.dispose()
    upgrade_database(app)
    with app.app_context():
        assert stored() == before
        db.engine.dispose()
