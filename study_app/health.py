"""Liveness and readiness: ``/healthz`` answers when the app and its database respond."""

from __future__ import annotations

from flask import Blueprint, jsonify, render_template
from sqlalchemy import text

from study_app.extensions import db

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    """200 with the database dialect when a trivial query succeeds, else 503."""
    try:
        db.session.execute(text("SELECT 1"))
    except Exception as error:  # noqa: BLE001 - report any database failure as not ready
        return jsonify(status="unavailable", error=str(error.__class__.__name__)), 503
    return jsonify(status="ok", database=db.engine.dialect.name)


@bp.get("/")
def index():
    """The landing page."""
    return render_template("index.html")
