"""The study web app: Flask + SQLAlchemy, served by gunicorn.

`create_app()` is the application factory (Flask's tutorial pattern): configuration from
defaults, then the instance folder's ``config.py`` (if any), then environment variables
(``DATABASE_URL``, ``SECRET_KEY``), then the caller's overrides (tests).
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask

from study_app.config import ConfigError, default_config, sqlite_url_for_instance
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

    trust_proxies(app)
    init_extensions(app)
    from study_app.stimuli import stimulus_roots

    stimulus_roots(app)  # a bad STIMULUS_ROOTS fails here, with the fix in the message

    from study_app import api, health, i18n, models  # noqa: F401 - models registers the tables

    i18n.init_app(app)
    app.register_blueprint(health.bp)
    api.init_app(app)
    from study_app import auth, participant, researcher, security

    security.init_security(app)
    app.register_blueprint(auth.bp)
    app.register_blueprint(participant.bp)
    app.register_blueprint(researcher.bp)
    security.exempt_json_api(app)
    return app


def trust_proxies(app: Flask) -> None:
    """Behind ``TRUSTED_PROXIES`` reverse proxies (e.g. nginx terminating HTTPS), take the
    client address, scheme and host from their ``X-Forwarded-*`` headers (werkzeug's
    ProxyFix), so secure cookies, redirects and per-client rate limits see the real ones.
    0 (the default) trusts no header: set it only when every request comes through them.
    """
    hops = app.config.get("TRUSTED_PROXIES", 0)
    if isinstance(hops, bool) or not isinstance(hops, int) or hops < 0:
        raise ConfigError(
            f"TRUSTED_PROXIES must be a whole number of proxies in front of the app, got "
            f"{hops!r} (e.g. PSTUDY_TRUSTED_PROXIES=1 behind one nginx)"
        )
    if hops:
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)


__all__ = ["create_app", "db"]
