"""Researcher login and logout; ``login_required`` guards every researcher page.

The session (a signed, Secure, HttpOnly, SameSite cookie; see :mod:`study_app.security`)
holds ``researcher_id``; the JSON API also reads it to allow previews. Passwords are
checked against the werkzeug hash on :class:`study_app.models.Researcher`; accounts are
made with ``pstudy researcher create``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_wtf import FlaskForm
from sqlalchemy import func, select
from werkzeug.security import check_password_hash, generate_password_hash
from wtforms import EmailField, PasswordField
from wtforms.validators import DataRequired, Length

from study_app.extensions import db
from study_app.models import Researcher

bp = Blueprint("auth", __name__)

# Checked when the e-mail is unknown, so a wrong address takes as long as a wrong password.
_DUMMY_HASH = generate_password_hash("not-a-real-password")


class LoginForm(FlaskForm):
    email = EmailField("E-mail", validators=[DataRequired(), Length(max=254)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=1024)])


def current_researcher() -> Researcher | None:
    """The logged-in researcher of this request, or None."""
    if "researcher" not in g:
        researcher_id = session.get("researcher_id")
        g.researcher = db.session.get(Researcher, researcher_id) if researcher_id else None
    return g.researcher


def login_required(view: Callable) -> Callable:
    """Redirect to the login page (or 401 JSON for JSON requests) without a session."""

    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        if current_researcher() is None:
            if request.accept_mimetypes.best == "application/json":
                return {"error": "log in as a researcher first", "status": 401}, 401
            return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
        return view(*args, **kwargs)

    wrapped.login_required = True  # type: ignore[attr-defined]
    return wrapped


def _safe_next(target: str | None) -> str:
    """Only same-site relative paths are followed after login (no open redirect)."""
    if target:
        parts = urlsplit(target)
        if (
            not parts.scheme
            and not parts.netloc
            and target.startswith("/")
            and not target.startswith("//")
        ):
            return target
    return url_for("researcher.index")


LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def cookie_problem() -> str | None:
    """Why a browser will drop the login cookie here (plain HTTP off localhost), or None."""
    if request.is_secure or not current_app.config.get("SESSION_COOKIE_SECURE"):
        return None
    if request.host.rsplit(":", 1)[0] in LOCAL_HOSTS or request.host in LOCAL_HOSTS:
        return None
    return (
        "This page was reached over plain HTTP, so your browser will not keep the "
        "secure login cookie. Serve the app over HTTPS (recommended), or set "
        "PSTUDY_ALLOW_INSECURE_COOKIES=true for a trusted local network."
    )


@bp.route("/login", methods=["GET", "POST"])
def login():
    """The login form; a success starts a fresh session."""
    form = LoginForm()
    error = None
    if form.validate_on_submit():
        email = form.email.data.strip().lower()
        researcher = db.session.scalars(
            select(Researcher).where(func.lower(Researcher.email) == email)
        ).first()
        if researcher is None:
            check_password_hash(_DUMMY_HASH, form.password.data)
        elif researcher.check_password(form.password.data):
            target = _safe_next(request.args.get("next"))
            session.clear()  # no session fixation
            session["researcher_id"] = researcher.id
            session.permanent = True
            return redirect(target)
        error = "Wrong e-mail or password."
    status = 401 if error else 200
    return render_template(
        "auth/login.html", form=form, error=error, cookie_problem=cookie_problem()
    ), status


@bp.post("/logout")
def logout():
    """End the session (POST with the CSRF token, so a link elsewhere cannot log you out)."""
    session.clear()
    flash("You are logged out.", "success")
    return redirect(url_for("auth.login"))
