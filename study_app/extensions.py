"""Flask extensions, created unbound and wired with ``init_app`` in the factory."""

from __future__ import annotations

from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase

SQLITE_BUSY_TIMEOUT_MS = 15_000


class Base(DeclarativeBase):
    """Declarative base for the typed SQLAlchemy 2.0 models."""


db = SQLAlchemy(model_class=Base)


def _configure_sqlite(dbapi_connection, _record) -> None:
    """WAL journal, a busy timeout and foreign keys for every SQLite connection."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def init_extensions(app: Flask) -> None:
    """Bind the extensions to ``app``."""
    db.init_app(app)
    with app.app_context():
        engine: Engine = db.engine
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _configure_sqlite)
