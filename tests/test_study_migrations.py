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

TABLES = {"researcher", "stimulus_set", "condition", "image", "stimulus", "study", "item",
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
