"""The study web app: Flask + SQLAlchemy, served by gunicorn.

`create_app()` is the application factory (Flask's tutorial pattern): configuration from
defaults, then the instance folder's ``config.py`` (if any), then environment variables
(``DATABASE_URL``, ``SECRET_KEY``), then the caller's overrides (tests).
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask

from study_app.config import default_config, sqlite_url_for_instance
from study_app.extensions import db, init_extensions


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Build and configure the Flask app; ``test_config`` overrides everything else."""
    app = Flask(__name__, instance_relative_config=True)
    app.config.from_mapping(default_config())
    app.config.from_pyfile("config.py", silent=True)
    if os.environ.get("DATABASE_URL"):
        app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["DATABASE_URL"]
    if os.environ.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = os.environ["SECRET_KEY"]
    app.config.from_prefixed_env("PSTUDY")  # e.g. PSTUDY_PARTICIPANT_RATE_LIMIT='[100, 1]'
    if test_config:
        app.config.from_mapping(test_config)
    if not app.config.get("SQLALCHEMY_DATABASE_URI"):
        os.makedirs(app.instance_path, exist_ok=True)
        app.config["SQLALCHEMY_DATABASE_URI"] = sqlite_url_for_instance(app.instance_path)

    init_extensions(app)

    from study_app import api, health, models  # noqa: F401 - models registers the tables

    app.register_blueprint(health.bp)
    api.init_app(app)
    from study_app import auth, participant, researcher, security

    security.init_security(app)
    app.register_blueprint(auth.bp)
    app.register_blueprint(participant.bp)
    app.register_blueprint(researcher.bp)
    security.exempt_json_api(app)
    return app


__all__ = ["create_app", "db"]
