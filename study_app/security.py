"""Security for every response: headers, cookies, CSRF, error pages, participant limits.

- Content-Security-Policy with no inline scripts or styles (every script and style sheet
  is a file under ``static/``), frame protection (``frame-ancestors 'none'`` and
  ``X-Frame-Options: DENY``), ``nosniff``, a same-origin referrer policy;
- session cookies ``Secure``, ``HttpOnly``, ``SameSite=Lax`` (set
  ``ALLOW_INSECURE_COOKIES = True`` only for plain-HTTP use on another host than
  localhost; browsers accept secure cookies from ``http://localhost``/``127.0.0.1``);
- CSRF tokens (flask-wtf's ``CSRFProtect``) on every form; the participant JSON API is
  exempt because it only accepts ``application/json`` bodies (a cross-site form cannot
  send that without a CORS preflight, which this app never grants) and every vote carries
  a server-issued trial token;
- errors never show a stack trace: HTML pages or JSON ``{"error": ...}`` for API paths;
- participant endpoints (pages under ``/s/`` and the JSON API under ``/api/``) have a
  smaller request-size limit and a per-client request-rate limit (a sliding window kept
  per worker process; ``PARTICIPANT_RATE_LIMIT = (requests, seconds)`` or ``None``);
- the login form is throttled per account and per address with counts kept in the
  database (:mod:`study_app.throttle`, ``LOGIN_MAX_FAILURES_PER_*``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from flask import Flask, Response, current_app, jsonify, render_template, request
from flask.sessions import SecureCookieSessionInterface
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.exceptions import HTTPException, InternalServerError

csrf = CSRFProtect()
log = logging.getLogger(__name__)

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "font-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)

SECURITY_DEFAULTS: dict = {
    "SESSION_COOKIE_SECURE": True,
    "SESSION_COOKIE_HTTPONLY": True,
    "SESSION_COOKIE_SAMESITE": "Lax",
    "REMEMBER_COOKIE_SECURE": True,
    "PERMANENT_SESSION_LIFETIME": 8 * 3600,  # seconds: a researcher's working day
    "WTF_CSRF_TIME_LIMIT": 8 * 3600,  # seconds
    # Participant endpoints: at most this many requests per client address per window
    # (per worker process). 3000/min lets a lab of ~50 people behind one NAT vote at full
    # speed while stopping a flood; None switches the limit off.
    "PARTICIPANT_RATE_LIMIT": (3000, 60.0),
    # Participant request bodies (votes, start requests) are tiny JSON documents (bytes).
    "PARTICIPANT_MAX_CONTENT_LENGTH": 16 * 1024,
    # Login throttling (study_app.throttle; counted in the database, so across workers and
    # hosts): this many failures per typed e-mail, or per client address, within the
    # window make the login form answer 429 until the oldest leaves it. 0: no limit.
    "LOGIN_MAX_FAILURES_PER_ACCOUNT": 5,
    "LOGIN_MAX_FAILURES_PER_ADDRESS": 20,
    "LOGIN_FAILURE_WINDOW_S": 15 * 60,
}

PARTICIPANT_PREFIXES = ("/api/", "/s/")


@dataclass
class SlidingWindowLimiter:
    """At most ``limit`` hits per ``window_s`` seconds per key (thread-safe, in memory)."""

    limit: int
    window_s: float
    _hits: dict[str, deque] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def hit(self, key: str, now: float | None = None) -> float:
        """Record one hit; return 0.0 when allowed, else the seconds until one is allowed."""
        now = time.monotonic() if now is None else now
        with self._lock:
            hits = self._hits.setdefault(key, deque())
            while hits and hits[0] <= now - self.window_s:
                hits.popleft()
            if len(hits) >= self.limit:
                return max(hits[0] + self.window_s - now, 0.001)
            hits.append(now)
            if len(self._hits) > 100_000:  # bound memory: forget idle clients
                for stale in [k for k, v in self._hits.items() if not v]:
                    del self._hits[stale]
            return 0.0


def is_participant_path(path: str) -> bool:
    """True for participant pages and the participant JSON API."""
    return path.startswith(PARTICIPANT_PREFIXES)


def wants_json() -> bool:
    """Answer errors as JSON for the API and for clients that ask for JSON."""
    if request.path.startswith("/api/"):
        return True
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json" and not request.accept_mimetypes.accept_html


def error_response(status: int, title: str, message: str, code: str | None = None,
                   **extra) -> Response:
    """A JSON or HTML error with ``status``; never a stack trace. JSON errors have the
    API's shape ``{"error", "code", "status"}`` (``code`` defaults to the title in
    snake_case)."""
    if wants_json():
        code = code or "_".join(title.lower().split())
        response = jsonify(error=message, code=code, status=status, **extra)
    else:
        response = current_app.make_response(
            render_template("error.html", status=status, title=title, message=message)
        )
    response.status_code = status
    return response


def _set_security_headers(response: Response) -> Response:
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "same-origin")
    headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
    headers.setdefault("Permissions-Policy", "camera=(), microphone=(), geolocation=()")
    if request.is_secure:
        headers.setdefault("Strict-Transport-Security", "max-age=31536000")
    if request.path.startswith(("/researcher", "/login", "/logout")):
        headers["Cache-Control"] = "no-store"
    return response


def _limit_participant_requests():
    if not is_participant_path(request.path):
        return None
    limit = current_app.config.get("PARTICIPANT_MAX_CONTENT_LENGTH")
    if limit:
        if request.content_length is not None and request.content_length > limit:
            return error_response(
                413,
                "Request too large",
                f"request body of {request.content_length} bytes is over the limit of "
                f"{limit} bytes for participant requests",
                code="payload_too_large",
            )
        request.max_content_length = limit  # also bounds chunked bodies while reading
    limiter: SlidingWindowLimiter | None = current_app.extensions.get("pstudy_rate_limiter")
    if limiter is not None:
        wait_s = limiter.hit(request.remote_addr or "unknown")
        if wait_s:
            response = error_response(
                429,
                "Too many requests",
                f"more than {limiter.limit} requests in {limiter.window_s:g} s from this "
                "address; wait and try again",
                code="rate_limited",
                retry_after_s=round(wait_s, 3),
            )
            response.headers["Retry-After"] = str(max(1, round(wait_s)))
            return response
    return None


def _handle_http_exception(error: HTTPException):
    if error.code is None or error.code < 400:
        return error
    response = error_response(error.code, error.name, error.description or error.name)
    if error.code == 405 and error.valid_methods:
        response.headers["Allow"] = ", ".join(error.valid_methods)
    return response


def _handle_csrf_error(error: CSRFError):
    return error_response(
        400,
        "Form expired",
        f"{error.description} Reload the page and submit the form again.",
    )


def _handle_unexpected(error: Exception):
    if isinstance(error, HTTPException):
        return _handle_http_exception(error)
    log.exception("unhandled error on %s %s", request.method, request.path)
    return error_response(
        500,
        "Something went wrong",
        InternalServerError.description + " The error was logged.",
    )


class CookieSessionInterface(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions, minus building the signing serializer for a request
    that carries no session cookie (every participant API call: ~5% of a vote's CPU).
    The result is the same empty session Flask would make."""

    def open_session(self, app: Flask, request):
        if app.secret_key and self.get_cookie_name(app) not in request.cookies:
            return self.session_class()
        return super().open_session(app, request)


def init_security(app: Flask) -> None:
    """Apply the defaults (unless configured), CSRF, headers, error handlers and limits."""
    for key, value in SECURITY_DEFAULTS.items():
        if key not in app.config or app.config[key] == Flask.default_config.get(key):
            app.config[key] = value
    if app.config.get("ALLOW_INSECURE_COOKIES"):
        app.config["SESSION_COOKIE_SECURE"] = False
    csrf.init_app(app)
    app.session_interface = CookieSessionInterface()
    rate = app.config.get("PARTICIPANT_RATE_LIMIT")
    if rate:
        requests_allowed, window_s = rate
        app.extensions["pstudy_rate_limiter"] = SlidingWindowLimiter(
            int(requests_allowed), float(window_s)
        )
    app.before_request(_limit_participant_requests)
    app.after_request(_set_security_headers)
    app.register_error_handler(CSRFError, _handle_csrf_error)
    app.register_error_handler(HTTPException, _handle_http_exception)
    app.register_error_handler(Exception, _handle_unexpected)


def exempt_json_api(app: Flask) -> None:
    """Exempt the JSON API blueprints (URL prefix ``/api``) from form CSRF tokens.

    Call after every blueprint is registered (the end of ``create_app``).
    """
    for blueprint in app.blueprints.values():
        if (blueprint.url_prefix or "").startswith("/api"):
            csrf.exempt(blueprint)
