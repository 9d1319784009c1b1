"""Default configuration values and helpers for database URLs."""

from __future__ import annotations

import os
import secrets


class ConfigError(ValueError):
    """A setting has a value the app cannot use; the message names it and the fix."""


def default_config() -> dict:
    """Settings every app starts from; the instance folder, env vars and tests override."""
    return {
        # A random key per process is safe only for a single process; `pstudy serve`
        # writes a persistent key into the instance folder so all workers share it.
        "SECRET_KEY": secrets.token_hex(32),
        "SQLALCHEMY_DATABASE_URI": None,
        # no pool_pre_ping: server connections idle for a while are pinged instead
        # (study_app.extensions.configure_engine), a round trip saved per request
        "SQLALCHEMY_ENGINE_OPTIONS": {},
        "MAX_CONTENT_LENGTH": 64 * 1024,
        # Reverse proxies in front of the app whose X-Forwarded-* headers are trusted.
        "TRUSTED_PROXIES": 0,
    }


def sqlite_url_for_instance(instance_path: str) -> str:
    """The embedded default database: ``<instance>/study.sqlite3``."""
    return "sqlite:///" + os.path.join(instance_path, "study.sqlite3")
