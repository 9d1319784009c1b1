"""Helpers shared by the fixtures and tests (no fixtures here)."""

from __future__ import annotations

import glob
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM_PATH = "/usr/bin/chromium"
# As root, and off the closed network (no background fetches, no component updates).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


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
