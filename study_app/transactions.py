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


def run_write(fn: Callable[[], T], attempts: int = RETRY_ATTEMPTS) -> T:
    """Run ``fn`` in a write transaction and commit; roll back on any exception.

    Lock timeouts and deadlocks are retried with jittered backoff, then raise
    :class:`DatabaseBusy`. Exceptions raised by ``fn`` (e.g. API errors) roll back and
    propagate, so a rejected request changes nothing.
    """
    for attempt in range(attempts):
        try:
            begin_write()
            result = fn()
            db.session.commit()
            return result
        except (OperationalError, DBAPIError) as error:
            db.session.rollback()
            if not _retryable(error):
                raise
            if attempt == attempts - 1:
                raise DatabaseBusy(str(error.orig)) from error
            time.sleep(RETRY_BASE_DELAY_S * (2**attempt) * (0.5 + random.random()))
        except BaseException:
            db.session.rollback()
            raise
    raise AssertionError("unreachable")
