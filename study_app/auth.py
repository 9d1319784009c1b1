"""Researcher login and logout; ``login_required`` guards every researcher page.

The session (a signed, Secure, HttpOnly, SameSite cookie; see :mod:`study_app.security`)
holds a random login token; the server keeps its SHA-256 in ``researcher_login``
(:class:`study_app.models.ResearcherLogin`) and honours it until logout, a new password
or ``PERMANENT_SESSION_LIFETIME`` after the login. A signed cookie alone cannot be taken
back: a copy, or a dashboard poll answered after the logout (its response re-sends the
session it started with), would stay logged in for hours. The JSON API asks
:func:`current_researcher` too, to allow previews. Passwords are checked against the
werkzeug hash on :class:`study_app.models.Researcher`; accounts are made with ``pstudy
researcher create``.
"""

from __future__ import annotations

import functools
import hashlib
import math
import secrets
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
from sqlalchemy import delete, func, or_, select, update
from werkzeug.security import check_password_hash, generate_password_hash
from wtforms import EmailField, PasswordField
from wtforms.validators import DataRequired, Length

from study_app.extensions import db
from study_app.models import Researcher, ResearcherLogin, utcnow

bp = Blueprint("auth", __name__)

# Checked when the e-mail is unknown, so a wrong address takes as long as a wrong password.
_DUMMY_HASH = generate_password_hash("not-a-real-password")


class LoginForm(FlaskForm):
    email = EmailField("E-mail", validators=[DataRequired(), Length(max=254)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=1024)])


LOGIN_KEY = "login"  # the session key of the login token


def _token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _session_token() -> str | None:
    """This request's login token, or None."""
    token = session.get(LOGIN_KEY)
    return token if isinstance(token, str) and token else None


def researcher_by_email(email: str) -> Researcher | None:
    """The account with this e-mail address (case-insensitive), or None."""
    return db.session.scalars(
        select(Researcher).where(func.lower(Researcher.email) == email.strip().lower())
    ).first()


def current_researcher() -> Researcher | None:
    """The logged-in researcher of this request, or None (no token, or its login ended or
    expired)."""
    if "researcher" not in g:
        token = _session_token()
        g.researcher = None
        if token is not None:
            g.researcher = db.session.scalars(
                select(Researcher)
                .join(ResearcherLogin, ResearcherLogin.researcher_id == Researcher.id)
                .where(
                    ResearcherLogin.token_sha256 == _token_digest(token),
                    ResearcherLogin.ended_at.is_(None),
                    ResearcherLogin.created_at > utcnow() - current_app.permanent_session_lifetime,
                )
            ).first()
    return g.researcher


def start_login(researcher: Researcher) -> None:
    """Record a new login of ``researcher`` and put its token in a fresh session; the
    researcher's ended and expired logins are deleted on the way."""
    now = utcnow()
    db.session.execute(
        delete(ResearcherLogin).where(
            ResearcherLogin.researcher_id == researcher.id,
            or_(
                ResearcherLogin.ended_at.is_not(None),
                ResearcherLogin.created_at <= now - current_app.permanent_session_lifetime,
            ),
        )
    )
    token = secrets.token_urlsafe(32)
    db.session.add(
        ResearcherLogin(researcher_id=researcher.id, token_sha256=_token_digest(token),
                        created_at=now)
    )
    db.session.commit()
    session.clear()  # no session fixation
    session[LOGIN_KEY] = token
    session.permanent = True
    g.researcher = researcher


def end_logins(researcher_id: int | None = None, token: str | None = None) -> int:
    """End the login of ``token``, or every open login of ``researcher_id`` (a new
    password); -> the number ended. The caller commits."""
    condition = (
        ResearcherLogin.token_sha256 == _token_digest(token)
        if token is not None
        else ResearcherLogin.researcher_id == researcher_id
    )
    result = db.session.execute(
        update(ResearcherLogin)
        .where(condition, ResearcherLogin.ended_at.is_(None))
        .values(ended_at=utcnow())
    )
    return result.rowcount


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
    from study_app.throttle import clear_login_failures, login_wait_s, record_login_failure

    form = LoginForm()
    error = None
    status = 200
    wait_s = 0.0
    if form.validate_on_submit():
        email, address = form.email.data, request.remote_addr or "unknown"
        wait_s, limit = login_wait_s(email, address)
        if wait_s:  # too many failures: the password is not even checked
            minutes = max(1, math.ceil(wait_s / 60))
            error = (
                f"Too many failed logins {_THROTTLED[limit]}. Wait {minutes} minute"
                f"{'s' if minutes > 1 else ''} and try again (or ask an administrator to run "
                "`pstudy researcher unlock EMAIL`)."
            )
            status = 429
        else:
            researcher = researcher_by_email(email)
            if researcher is None:
                check_password_hash(_DUMMY_HASH, form.password.data)
            elif researcher.check_password(form.password.data):
                target = _safe_next(request.args.get("next"))
                clear_login_failures(email)
                start_login(researcher)  # commits
                return redirect(target)
            record_login_failure(email, address)
            error = "Wrong e-mail or password."
            status = 401
    response = current_app.make_response((render_template(
        "auth/login.html", form=form, error=error, cookie_problem=cookie_problem()
    ), status))
    if wait_s:
        response.headers["Retry-After"] = str(max(1, math.ceil(wait_s)))
    return response


_THROTTLED = {"account": "for this account", "address": "from your network address"}


@bp.post("/logout")
def logout():
    """End the login on the server and clear the session (POST with the CSRF token, so a
    link elsewhere cannot log you out)."""
    token = _session_token()
    if token is not None:
        end_logins(token=token)
        db.session.commit()
    session.clear()
    flash("You are logged out.", "success")
    return redirect(url_for("auth.login"))
