"""Shared fixtures: per-test SQLite apps, a throwaway PostgreSQL server, a real Chromium.

Missing components (PostgreSQL binaries, /usr/bin/chromium) fail the test when ``CI`` is
set, so CI can never pass by skipping; on a developer machine they skip with the fix.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    CHROMIUM_ARGS,
    CHROMIUM_PATH,
    PostgresServer,
    find_postgres_bindir,
    free_port,
    require_component,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO_ROOT / "test-artifacts"


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where CUDA is present (they never run in CI)."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# --------------------------------------------------------------------------- Flask app


@pytest.fixture
def app(tmp_path):
    """A fresh app over a temporary SQLite database with the schema created."""
    from study_app import create_app
    from study_app.extensions import db

    app = create_app(
        {
            "TESTING": True,
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'test.sqlite3'}",
            "SECRET_KEY": "test-secret",
        }
    )
    with app.app_context():
        db.create_all()
    yield app
    with app.app_context():
        db.engine.dispose()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server in a temporary folder on 127.0.0.1, for the whole run."""
    bindir = find_postgres_bindir()
    require_component(bindir is not None, "PostgreSQL (initdb/pg_ctl)", "apt-get install postgresql")
    datadir_parent = Path(tempfile.mkdtemp(prefix="pstudy-pg-"))
    datadir = datadir_parent / "data"
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
        shutil.chown(datadir_parent, "postgres", "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run(
        [*run_as, str(bindir / "initdb"), "-D", str(datadir), "-U", "postgres",
         "--auth=trust", "-E", "UTF8", "--locale=C"],
        check=True, capture_output=True,
    )
    options = (
        f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={datadir_parent} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
    )
    subprocess.run(
        [*run_as, str(bindir / "pg_ctl"), "-D", str(datadir), "-o", options, "-w",
         "-l", str(datadir_parent / "server.log"), "start"],
        check=True, capture_output=True,
    )
    server = PostgresServer(host="127.0.0.1", port=port, user="postgres")
    try:
        yield server
    finally:
        subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "immediate",
                        "stop"], capture_output=True)
        shutil.rmtree(datadir_parent, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A URL to a brand-new, empty PostgreSQL database, dropped after the test."""
    name = "t_" + uuid.uuid4().hex[:12]
    postgres_server.create_database(name)
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.drop_database(name)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_database_url(request, tmp_path) -> str:
    """A URL to an empty database: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.sqlite3'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def db_app(any_database_url):
    """A migrated app (Alembic, up to head) on SQLite (file, WAL) or a fresh PostgreSQL
    database, without the participant rate limit."""
    from flask_migrate import upgrade

    from study_app import create_app
    from study_app.extensions import db

    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": any_database_url,
                      "PARTICIPANT_RATE_LIMIT": (10**6, 60.0)})
    with app.app_context():
        upgrade()
    yield app
    with app.app_context():
        db.engine.dispose()


# --------------------------------------------------------------------------- Chromium


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium driven by Playwright (headless; no browser download)."""
    require_component(os.path.exists(CHROMIUM_PATH), "Chromium", "apt-get install chromium")
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    chromium = playwright.chromium.launch(
        executable_path=CHROMIUM_PATH, headless=True, args=CHROMIUM_ARGS
    )
    try:
        yield chromium
    finally:
        chromium.close()
        playwright.stop()


@pytest.fixture
def page(browser, request):
    """A fresh browser context and page; a screenshot is kept in test-artifacts/."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    yield page
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"))
    finally:
        context.close()


# --------------------------------------------------------------------------- live servers


@pytest.fixture
def live_server(app) -> Iterator[str]:
    """The test app served by werkzeug in a thread; yields its base URL."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)
