"""Write transactions that are safe under concurrency on SQLite and PostgreSQL.

SQLite: a write transaction starts with ``BEGIN IMMEDIATE`` (one writer at a time; the
others wait up to the busy timeout). PostgreSQL: READ COMMITTED plus explicit row locks
(``SELECT ... FOR UPDATE``, ``SKIP LOCKED`` for scheduling); a deadlock or serialization
failure is retried.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, OperationalError

from study_app.extensions import SQLITE_IMMEDIATE, db

T = TypeVar("T")
RETRY_ATTEMPTS = 5
RETRY_BASE_DELAY_S = 0.02


class DatabaseBusy(RuntimeError):
    """The database stayed locked after the retries (answered as 503 by the API)."""


def _retryable(error: DBAPIError) -> bool:
    text = str(error.orig).lower() if error.orig is not None else str(error).lower()
    return any(
        marker in text
        for marker in ("database is locked", "deadlock detected", "could not serialize",
                       "database table is locked")
    )


def begin_write() -> None:
    """End any open (read) transaction and begin a write transaction on the session."""
    session = db.session()
    if session.in_transaction():
        session.commit()
    session.connection(execution_options={SQLITE_IMMEDIATE: True})


def _with_retries(attempt_once: Callable[[], T], rollback: Callable[[], None],
                  attempts: int) -> T:
    """``attempt_once()`` until it succeeds; lock timeouts, deadlocks and connections
    that died in use (server restart) are retried with jittered backoff, then raise
    :class:`DatabaseBusy`; any other exception rolls back and propagates."""
    for attempt in range(attempts):
        try:
            return attempt_once()
        except (OperationalError, DBAPIError) as error:
            rollback()
            if not (_retryable(error) or getattr(error, "connection_invalidated", False)):
                raise
            if attempt == attempts - 1:
                raise DatabaseBusy(str(error.orig)) from error
            time.sleep(RETRY_BASE_DELAY_S * (2**attempt) * (0.5 + random.random()))
        except BaseException:
            rollback()
            raise
    raise AssertionError("unreachable")


def run_write(fn: Callable[[], T], attempts: int = RETRY_ATTEMPTS) -> T:
    """Run ``fn`` in a write transaction of the ORM session and commit; roll back on any
    exception (retries: :func:`_with_retries`). Exceptions raised by ``fn`` (e.g. API
    errors) roll back and propagate, so a rejected request changes nothing."""

    def attempt_once() -> T:
        begin_write()
        result = fn()
        db.session.commit()
        return result

    return _with_retries(attempt_once, db.session.rollback, attempts)


def run_on_connection(fn: Callable[[Connection], T], autocommit: bool = False,
                      attempts: int = RETRY_ATTEMPTS) -> T:
    """Run ``fn(connection)`` on a pooled Core connection, no ORM session (the vote's hot
    path: the session's bookkeeping cost more than its statements), in one write
    transaction (SQLite: ``BEGIN IMMEDIATE``) or, with ``autocommit``, for an ``fn`` that
    writes in one statement, with no BEGIN/COMMIT round trips. Same retries as
    :func:`run_write`; the connection goes back to the pool either way."""
    options = {"isolation_level": "AUTOCOMMIT"} if autocommit else {SQLITE_IMMEDIATE: True}

    def attempt_once() -> T:
        with db.engine.connect() as connection:
            connection.execution_options(**options)
            try:
                with connection.begin():
                    return fn(connection)
            except connection.dialect.loaded_dbapi.Error as error:
                raise _as_sqlalchemy_error(connection, error) from error

    return _with_retries(attempt_once, lambda: None, attempts)


def _as_sqlalchemy_error(connection: Connection, error: Exception) -> DBAPIError:
    """An error ``fn`` got from the driver directly (the hot path bypasses SQLAlchemy's
    execution), as SQLAlchemy would have raised it: a lost connection is invalidated (the
    pool drops it) and marked, so :func:`_with_retries` retries on a new one."""
    dialect = connection.dialect
    lost = connection.invalidated or dialect.is_disconnect(
        error, connection.connection.dbapi_connection, None)
    if lost and not connection.invalidated:
        connection.invalidate(error)
    return DBAPIError.instance(None, None, error, dialect.loaded_dbapi.Error,
                               connection_invalidated=lost, dialect=dialect)
