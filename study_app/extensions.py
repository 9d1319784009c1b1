"""Flask extensions, created unbound and wired with ``init_app`` in the factory.

SQLite: WAL journal, a busy timeout, foreign keys; transactions are begun by SQLAlchemy
(the driver's own implicit BEGIN is switched off) so that a write transaction can start
with ``BEGIN IMMEDIATE`` (see :func:`study_app.db.write_transaction`): one writer at a
time, waiting up to the busy timeout instead of failing on a lock upgrade.
"""

from __future__ import annotations

import time
from pathlib import Path

from flask import Flask
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import DeclarativeBase

SQLITE_BUSY_TIMEOUT_MS = 15_000
# A pooled server connection idle this long is pinged before use (a busy server's
# connections are not: one round trip saved per request; see configure_engine).
PING_AFTER_IDLE_S = 5.0
# Execution option that makes the next transaction on a SQLite connection BEGIN IMMEDIATE.
SQLITE_IMMEDIATE = "pstudy_sqlite_immediate"
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


class Base(DeclarativeBase):
    """Declarative base for the typed SQLAlchemy 2.0 models."""


db = SQLAlchemy(model_class=Base)
migrate = Migrate(directory=str(MIGRATIONS_DIR), render_as_batch=True, compare_type=True)


def _configure_sqlite(dbapi_connection, _record) -> None:
    """WAL journal, a busy timeout and foreign keys for every SQLite connection."""
    dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_begin(connection) -> None:
    """BEGIN (readers) or BEGIN IMMEDIATE (writers that asked for it)."""
    if connection.get_execution_options().get(SQLITE_IMMEDIATE):
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        connection.exec_driver_sql("BEGIN")


def configure_engine(engine: Engine) -> None:
    """SQLite: install the connection settings. Server databases: ping a pooled
    connection before use when it was idle for ``PING_AFTER_IDLE_S`` (a dead one is
    replaced); a connection that dies while in use invalidates the pool and the write
    is retried (:func:`study_app.transactions.run_write`)."""
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _configure_sqlite)
        event.listen(engine, "begin", _sqlite_begin)
        return
    # instead of SQLAlchemy's pool_pre_ping, which costs a round trip on every checkout
    event.listen(engine.pool, "checkin", _note_checkin)
    event.listen(engine.pool, "checkout", _ping_if_idle(engine.dialect))


def _note_checkin(_dbapi_connection, connection_record) -> None:
    connection_record.info["checked_in_at"] = time.monotonic()


def _ping_if_idle(dialect):
    def ping(dbapi_connection, connection_record, _proxy) -> None:
        checked_in_at = connection_record.info.get("checked_in_at")
        if checked_in_at is None or time.monotonic() - checked_in_at < PING_AFTER_IDLE_S:
            return
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as error:  # any failure: the pool discards it and connects anew
            raise DisconnectionError(f"pooled connection failed its ping: {error}") from error

    return ping


def read(statement, params: dict):
    """The result of ``statement`` (a Core select built once, its values bind
    parameters) on the ORM session's connection, in the session's transaction.

    The hot paths' reads: building a statement and running it through the ORM session
    cost ~0.3 ms of Python each, more than the database's own work for an index read;
    a prebuilt statement's compiled form is reused from the engine's cache (~0.02 ms).
    No autoflush: what it reads must not depend on unflushed changes of the session."""
    return db.session.connection().execute(statement, params)


def init_extensions(app: Flask) -> None:
    """Bind the extensions to ``app``."""
    db.init_app(app)
    migrate.init_app(app, db)
    with app.app_context():
        configure_engine(db.engine)
