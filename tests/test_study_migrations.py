"""Alembic migrations: up from an empty database, the result equals the models, and back
down, on SQLite and on PostgreSQL (through Flask-Migrate, as `flask db upgrade` runs)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from study_app import create_app
from study_app.extensions import db

TABLES = {"researcher", "researcher_login", "stimulus_set", "condition", "image", "stimulus", "study", "item",
          "participant", "trial", "vote"}


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
        downgrade(revision="base")
        assert set(inspect(db.engine).get_table_names()) <= {"alembic_version"}
        upgrade()
        assert TABLES <= set(inspect(db.engine).get_table_names())
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
        account = Researcher(email=EMAIL)
        account.set_password(PASSWORD)
        db.session.add(account)
        db.session.commit()
        db.engine.dispose()
    app = make_app(url)
    with app.app_context():
        assert "researcher_login" in inspect(db.engine).get_table_names()
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
