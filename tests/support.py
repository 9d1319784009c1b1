"""Helpers shared by the fixtures and tests (no fixtures here)."""

from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

# the browser the tests drive is the one that prints report.pdf
from analysis.report_pdf import CHROMIUM_ARGS, CHROMIUM_PATH  # noqa: F401  (re-exported)


def require_component(present: bool, what: str, fix: str) -> None:
    """Fail (in CI) or skip (elsewhere) when a real component the test needs is missing."""
    if present:
        return
    message = f"{what} is missing; install it with: {fix} (or run `make test`)"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


REPO = Path(__file__).resolve().parent.parent


def start_gunicorn(database_url: str, cwd: Path, port: int | None = None, workers: int = 4,
                   threads: int = 4) -> tuple[subprocess.Popen, str]:
    """The app under real gunicorn (the project's config) on 127.0.0.1, serving
    ``database_url``; returns ``(master process, base URL)`` once ``/healthz`` answers."""
    port = port or free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "SECRET_KEY": "reliability",
           "PSTUDY_BIND": f"127.0.0.1:{port}", "PSTUDY_WORKERS": str(workers),
           "PSTUDY_THREADS": str(threads), "PSTUDY_PARTICIPANT_RATE_LIMIT": "[1000000, 60]",
           "PSTUDY_LOG_LEVEL": "warning"}
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", str(REPO / "study_app" / "gunicorn.conf.py"),
         "study_app:create_app()"],
        env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(base + "/healthz", timeout=5).status_code == 200:
                return server, base
        except requests.RequestException:
            time.sleep(0.2)
    stop_gunicorn(server)
    pytest.fail("gunicorn did not come up within 60 s")


def stop_gunicorn(server: subprocess.Popen) -> None:
    """SIGTERM (graceful), then SIGKILL if it hangs."""
    if server.poll() is not None:
        return
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(timeout=10)


def gunicorn_workers(master_pid: int) -> list[int]:
    """The worker processes of a gunicorn master (its children)."""
    try:
        text = Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def find_postgres_bindir() -> Path | None:
    """The newest Debian PostgreSQL server's bin folder (``initdb``, ``pg_ctl``)."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
    )
    for candidate in reversed(candidates):
        if os.path.exists(os.path.join(candidate, "initdb")):
            return Path(candidate)
    return None


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL (psycopg 3 driver) for ``database``."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(
            host=self.host, port=self.port, user=self.user, dbname="postgres", autocommit=True
        ) as connection:
            connection.execute(sql)

    def create_database(self, name: str) -> None:
        self._admin(f'CREATE DATABASE "{name}"')

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
