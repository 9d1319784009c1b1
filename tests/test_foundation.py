"""The foundation: the console script, the app factory, and the real components the
rest of the suite relies on (SQLite, PostgreSQL, Chromium) each proven by a real test."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import Integer, String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column


def test_pstudy_help_and_version_run_as_a_console_script():
    completed = subprocess.run(
        [sys.executable, "-m", "study_app", "--help"], capture_output=True, text=True, check=True
    )
    assert "Perceptual Study Platform" in completed.stdout
    completed = subprocess.run(
        [sys.executable, "-m", "study_app", "--version"], capture_output=True, text=True,
        check=True,
    )
    from importlib.metadata import version

    assert completed.stdout.strip() == f"pstudy, version {version('perceptual-study-platform')}"


def test_unknown_subcommand_is_a_usage_error_not_a_traceback():
    completed = subprocess.run(
        [sys.executable, "-m", "study_app", "no-such-command"], capture_output=True, text=True
    )
    assert completed.returncode == 2
    assert "No such command" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_three_packages_import_independently():
    for package in ("study_app", "generation", "analysis"):
        completed = subprocess.run(
            [sys.executable, "-c", f"import {package}; print({package}.__name__)"],
            capture_output=True, text=True, check=True,
        )
        assert completed.stdout.strip() == package


def test_health_endpoint_reports_sqlite_in_wal_mode(app, client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "database": "sqlite"}
    from sqlalchemy import text

    from study_app.extensions import db

    with app.app_context():
        assert db.session.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_each_app_fixture_gets_its_own_database(app, tmp_path):
    assert str(tmp_path) in app.config["SQLALCHEMY_DATABASE_URI"]


class _Base(DeclarativeBase):
    pass


class _Probe(_Base):
    __tablename__ = "probe"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    label: Mapped[str] = mapped_column(String(50))


@pytest.mark.postgres
def test_postgres_server_round_trips_data(postgres_url):
    engine = create_engine(postgres_url)
    _Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([_Probe(label="left"), _Probe(label="right")])
        session.commit()
    with Session(engine) as session:
        labels = session.scalars(select(_Probe.label).order_by(_Probe.id)).all()
        version = session.execute(select(__import__("sqlalchemy").func.version())).scalar()
    engine.dispose()
    assert labels == ["left", "right"]
    assert version.startswith("PostgreSQL")


@pytest.mark.postgres
def test_app_runs_against_postgres(postgres_url):
    from study_app import create_app

    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": postgres_url})
    response = app.test_client().get("/healthz")
    assert response.get_json() == {"status": "ok", "database": "postgresql"}
    with app.app_context():
        from study_app.extensions import db

        db.engine.dispose()


@pytest.mark.browser
def test_chromium_reads_a_page_served_by_the_app(live_server, page):
    page.goto(live_server + "/")
    assert page.title() == "Perceptual Study Platform"
    assert page.locator("#tagline").inner_text() == "Which image-generation loss do humans prefer?"
    user_agent = page.evaluate("navigator.userAgent")
    assert "HeadlessChrome" in user_agent or "Chrome" in user_agent
