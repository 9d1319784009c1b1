"""Login throttling: failed attempts counted in the database, per account and per address.

Every wrong password (or unknown e-mail) at the login form stores a row in
``login_failure`` (:class:`study_app.models.LoginFailure`). Before a password is even
checked, the form asks :func:`login_wait_s`: with ``LOGIN_MAX_FAILURES_PER_ACCOUNT``
(default 5) failures for the typed e-mail, or ``LOGIN_MAX_FAILURES_PER_ADDRESS`` (default
20) from the client's address, within ``LOGIN_FAILURE_WINDOW_S`` (default 900 s), the
answer is 429 with ``Retry-After`` until the oldest of those failures leaves the window.
A successful login deletes the account's failures.

The counts live in the database the app already uses, so every gunicorn worker and every
host sees the same ones (the participant API's in-memory ``SlidingWindowLimiter`` counts
per process, which is fine for flood protection but would multiply a password budget by
the number of workers). Two attempts that arrive at the same moment may both be checked,
so the limit can be overshot by the number of concurrent requests, never more. A limit
of 0 switches that counter off. The defaults are in
:data:`study_app.security.SECURITY_DEFAULTS`.

The per-account counter cannot tell the owner from an attacker: someone who knows an
account's e-mail can keep it locked (one window at a time) by failing on purpose. The
owner can still log in once the window passes; an operator can clear the counter at
once with ``pstudy researcher unlock EMAIL``.
"""

from __future__ import annotations

from datetime import timedelta

from flask import current_app
from sqlalchemy import delete, select

from study_app.extensions import db
from study_app.models import LoginFailure, utcnow


def _key(email: str) -> str:
    return email.strip().lower()[:254]


def _window() -> timedelta:
    return timedelta(seconds=float(current_app.config["LOGIN_FAILURE_WINDOW_S"]))


def _wait_for(column, value: str, limit: int | None, now) -> float:
    """Seconds until fewer than ``limit`` failures with ``column == value`` remain in the
    window (0.0: fewer already)."""
    if not limit:
        return 0.0
    window = _window()
    # The limit-th newest failure: once it leaves the window, limit - 1 remain.
    boundary = db.session.scalar(
        select(LoginFailure.created_at)
        .where(column == value, LoginFailure.created_at > now - window)
        .order_by(LoginFailure.created_at.desc())
        .offset(int(limit) - 1)
        .limit(1)
    )
    if boundary is None:
        return 0.0
    return max((boundary + window - now).total_seconds(), 0.001)


def login_wait_s(email: str, address: str) -> tuple[float, str]:
    """(seconds to wait, which limit: "account" | "address") before another password for
    ``email`` from ``address`` may be checked; (0.0, "") when it may be checked now."""
    config = current_app.config
    now = utcnow()
    account = _wait_for(LoginFailure.email, _key(email),
                        config.get("LOGIN_MAX_FAILURES_PER_ACCOUNT"), now)
    by_address = _wait_for(LoginFailure.address, address[:64],
                           config.get("LOGIN_MAX_FAILURES_PER_ADDRESS"), now)
    if account >= by_address:
        return account, ("account" if account else "")
    return by_address, "address"


def record_login_failure(email: str, address: str) -> None:
    """Count one failed attempt; failures older than the window are deleted on the way."""
    now = utcnow()
    db.session.execute(delete(LoginFailure).where(LoginFailure.created_at <= now - _window()))
    db.session.add(LoginFailure(email=_key(email), address=address[:64], created_at=now))
    db.session.commit()


def clear_login_failures(email: str) -> int:
    """Forget the account's failures (a successful login, or ``pstudy researcher unlock``);
    -> how many. The caller commits."""
    result = db.session.execute(delete(LoginFailure).where(LoginFailure.email == _key(email)))
    return result.rowcount
