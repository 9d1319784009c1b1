"""Security: no researcher route answers without login (walking the URL map), headers and
CSP without inline code, CSRF, cookies, error pages without stack traces, participant
request-size and rate limits."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from flask import request, session

from study_app.security import CONTENT_SECURITY_POLICY, SlidingWindowLimiter
from tests.test_pages_support import (
    csrf_token,
    import_set,
    login,
    make_researcher,
    make_study,
    write_stimulus_set,
)

STUDY_APP = Path(__file__).resolve().parent.parent / "study_app"
# Endpoints anyone may reach: participants, the JSON API (participant-token
# authenticated), images, health, static files, the login form itself.
PUBLIC_ENDPOINTS = {
    "static",
    "health.healthz",
    "health.index",
    "media.media",
    "auth.login",
    "auth.logout",
    "participant.study_page",
}
PUBLIC_PREFIXES = ("api.",)


@pytest.fixture
def study(app, tmp_path):
    """A live study owned by the researcher ``login(client)`` logs in as."""
    owner = make_researcher(app)
    set_id = import_set(app, write_stimulus_set(tmp_path / "set"), owner=owner)
    return make_study(app, set_id, slug="guarded", owner=owner)


def concrete_urls(app, slug: str):
    """(endpoint, method, url) for every rule, with real values for its arguments."""
    values = {
        "slug": slug,
        "action": "pause",
        "decision": "approve",
        "fmt": "csv",
        "sha256": "0" * 64,
        "filename": "css/app.css",
    }
    with app.test_request_context():
        from flask import url_for

        for rule in app.url_map.iter_rules():
            args = {name: values.get(name, "1") for name in rule.arguments}
            url = url_for(rule.endpoint, **args)
            for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
                yield rule.endpoint, method, url


def is_public(endpoint: str) -> bool:
    return endpoint in PUBLIC_ENDPOINTS or endpoint.startswith(PUBLIC_PREFIXES)


def test_no_researcher_route_answers_without_login(app, client, study):
    token = csrf_token(client.get("/login").get_data(as_text=True))
    guarded = [(e, m, u) for e, m, u in concrete_urls(app, study["slug"]) if not is_public(e)]
    assert len(guarded) >= 12, guarded  # the walk covers the researcher blueprint
    assert {e.split(".")[0] for e, _, _ in guarded} == {"researcher"}
    for endpoint, method, url in guarded:
        response = client.open(url, method=method, data={"csrf_token": token})
        assert response.status_code == 302, (endpoint, method, url, response.status_code)
        assert response.headers["Location"].startswith("/login?next="), (endpoint, url)
        json_response = client.open(
            url, method=method, data={"csrf_token": token}, headers={"Accept": "application/json"}
        )
        assert json_response.status_code == 401, (endpoint, url)
    # The same routes do answer once logged in (so the walk is not vacuous).
    assert login(client).status_code == 302
    for endpoint, method, url in guarded:
        if method == "GET":
            response = client.get(url)
            assert response.status_code == 200, (endpoint, url, response.status_code)


def test_pages_send_csp_frame_protection_and_no_sniff(app, client, study):
    for url in ("/", "/login", "/s/guarded", "/api/v1/studies/guarded", "/nowhere"):
        headers = client.get(url).headers
        csp = headers["Content-Security-Policy"]
        assert csp == CONTENT_SECURITY_POLICY
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert "unsafe-eval" not in csp and "frame-ancestors 'none'" in csp
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["X-Content-Type-Options"] == "nosniff"
    login(client)
    assert client.get("/researcher/").headers["Cache-Control"] == "no-store"


def test_templates_and_pages_carry_no_inline_script_style_or_handler(app, client, study):
    inline_script = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>", re.I)
    handler = re.compile(r"\son[a-z]+\s*=", re.I)
    style_attribute = re.compile(r"\sstyle\s*=", re.I)
    files = list((STUDY_APP / "templates").rglob("*.html"))
    assert len(files) >= 8
    login(client)
    pages = [
        client.get(u).get_data(as_text=True)
        for u in (
            "/s/guarded",
            "/researcher/",
            "/researcher/studies/guarded",
            "/researcher/studies/new",
            "/researcher/studies/guarded/preview",
        )
    ]
    for text in [f.read_text() for f in files] + pages:
        assert not inline_script.search(text)
        assert not handler.search(text)
        assert not style_attribute.search(text)
        assert "<style" not in text
        assert "http://" not in text.replace("http://localhost", "")  # no CDN, no mixed


def test_forms_need_the_csrf_token_but_the_json_api_does_not(app, client, study):
    from study_app.extensions import db
    from study_app.models import Study

    assert (
        client.post(
            "/login",
            data={"email": "researcher@example.org", "password": "correct horse battery staple"},
        ).status_code
        == 400
    )
    login(client)
    refused = client.post("/researcher/studies/guarded/status/close")
    assert refused.status_code == 400 and "Reload the page" in refused.get_data(as_text=True)
    with app.app_context():
        assert db.session.get(Study, study["id"]).status == "live"
    # The participant API is exempt from form tokens but accepts JSON only, which a
    # cross-site form cannot send.
    assert client.post("/api/v1/studies/guarded/participants", json={}).status_code == 201
    form_post = client.post(
        "/api/v1/studies/guarded/participants",
        data="x=1",
        content_type="application/x-www-form-urlencoded",
    )
    assert form_post.status_code == 415


def test_session_cookie_flags_and_the_insecure_opt_out(app, tmp_path):
    from study_app import create_app

    assert app.config["SESSION_COOKIE_SECURE"] is True
    assert app.config["SESSION_COOKIE_HTTPONLY"] is True
    assert app.config["SESSION_COOKIE_SAMESITE"] == "Lax"
    plain = create_app(
        {
            "TESTING": True,
            "ALLOW_INSECURE_COOKIES": True,
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'x.sqlite3'}",
        }
    )
    assert plain.config["SESSION_COOKIE_SECURE"] is False


def test_sessions_without_a_cookie_are_empty_and_with_one_are_read(app):
    """The session interface skips the signing serializer only when there is no cookie:
    a signed cookie is still read, a tampered one still ignored."""
    with app.test_request_context("/api/v1/openapi.json"):
        empty = app.session_interface.open_session(app, request)
        assert dict(empty) == {} and not empty.modified
    with app.test_request_context("/"):
        session["marker"] = "kept"
        response = app.make_response("")
        app.session_interface.save_session(app, session, response)
        cookie = response.headers["Set-Cookie"].split(";")[0]
    name, value = cookie.split("=", 1)
    with app.test_request_context("/", headers={"Cookie": cookie}):
        assert app.session_interface.open_session(app, request)["marker"] == "kept"
    with app.test_request_context("/", headers={"Cookie": f"{name}={value[:-2]}xx"}):
        assert "marker" not in app.session_interface.open_session(app, request)


def test_login_page_warns_when_the_secure_cookie_cannot_be_kept(app, client):
    assert "cookie-problem" not in client.get("/login").get_data(as_text=True)
    assert "cookie-problem" not in client.get(
        "/login", base_url="https://study.example.org"
    ).get_data(as_text=True)
    warned = client.get("/login", base_url="http://192.168.1.20:8000").get_data(as_text=True)
    assert "PSTUDY_ALLOW_INSECURE_COOKIES=true" in warned
    app.config["SESSION_COOKIE_SECURE"] = False
    assert "cookie-problem" not in client.get(
        "/login", base_url="http://192.168.1.20:8000"
    ).get_data(as_text=True)


def test_errors_show_no_stack_trace(app, client):
    def explode():
        raise RuntimeError("secret internal detail")

    app.add_url_rule("/boom", "boom", explode)
    app.add_url_rule("/api/boom", "api_boom", explode)
    page = client.get("/boom")
    assert page.status_code == 500
    text = page.get_data(as_text=True)
    assert "Something went wrong" in text
    assert "Traceback" not in text and "secret internal detail" not in text
    api = client.get("/api/boom")
    assert api.status_code == 500 and api.is_json
    assert "secret internal detail" not in api.get_data(as_text=True)
    missing = client.get("/api/v1/nothing-here")
    assert missing.status_code == 404 and missing.get_json()["status"] == 404


def test_participant_requests_over_the_size_limit_are_refused(app, client, study):
    from sqlalchemy import func, select

    from study_app.extensions import db
    from study_app.models import Participant

    big = "{" + '"prolific_pid": "' + "a" * 20_000 + '"}'
    response = client.post(
        "/api/v1/studies/guarded/participants", data=big, content_type="application/json"
    )
    assert response.status_code == 413 and "over the limit" in response.get_json()["error"]
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(Participant)) == 0


def test_participant_endpoints_are_rate_limited_per_client(tmp_path):
    from study_app import create_app
    from study_app.extensions import db

    app = create_app(
        {
            "TESTING": True,
            "PARTICIPANT_RATE_LIMIT": (5, 60),
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'r.sqlite3'}",
        }
    )
    with app.app_context():
        db.create_all()
    client = app.test_client()
    codes = [client.get("/api/v1/studies/none").status_code for _ in range(5)]
    assert codes == [404] * 5
    limited = client.get("/s/none")
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    other = client.get("/api/v1/studies/none", environ_base={"REMOTE_ADDR": "10.0.0.9"})
    assert other.status_code == 404  # another address has its own budget
    assert client.get("/login").status_code == 200  # researcher pages are not limited
    with app.app_context():
        db.engine.dispose()


def test_sliding_window_limiter_counts_hits_inside_the_window():
    limiter = SlidingWindowLimiter(limit=3, window_s=10.0)
    assert [limiter.hit("a", now=t) for t in (0.0, 1.0, 2.0)] == [0.0, 0.0, 0.0]
    assert limiter.hit("a", now=3.0) == pytest.approx(7.0)
    assert limiter.hit("b", now=3.0) == 0.0
    assert limiter.hit("a", now=10.5) == 0.0  # the hit at t=0 left the window
    assert limiter.hit("a", now=10.6) == pytest.approx(0.4)


def test_behind_a_trusted_proxy_the_forwarded_client_scheme_and_host_count(tmp_path, monkeypatch):
    from study_app import create_app
    from study_app.extensions import db

    forwarded = {
        "X-Forwarded-For": "203.0.113.7",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "study.example.org",
    }

    def build(**config):
        app = create_app({
            "TESTING": True,
            "PARTICIPANT_RATE_LIMIT": (2, 60),
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'p.sqlite3'}",
            **config,
        })
        with app.app_context():
            db.create_all()
        return app

    # Not trusted (default): a forged header changes nothing; the login page still warns
    # that the secure cookie cannot be kept over plain HTTP from another host.
    direct = build().test_client()
    page = direct.get("/login", base_url="http://10.0.0.5:8000", headers=forwarded)
    assert "PSTUDY_ALLOW_INSECURE_COOKIES=true" in page.get_data(as_text=True)

    # Set from the environment like a deployment would.
    monkeypatch.setenv("PSTUDY_TRUSTED_PROXIES", "1")
    proxied = build().test_client()
    page = proxied.get("/login", base_url="http://10.0.0.5:8000", headers=forwarded)
    assert "cookie-problem" not in page.get_data(as_text=True)  # the proxy spoke HTTPS
    # Rate limits are per real client: two clients behind the one proxy address.
    for _ in range(2):
        assert proxied.get("/s/none", headers=forwarded).status_code == 404
    assert proxied.get("/s/none", headers=forwarded).status_code == 429
    other = dict(forwarded, **{"X-Forwarded-For": "198.51.100.4"})
    assert proxied.get("/s/none", headers=other).status_code == 404

    monkeypatch.setenv("PSTUDY_TRUSTED_PROXIES", '"yes"')
    with pytest.raises(ValueError, match="PSTUDY_TRUSTED_PROXIES=1"):
        build()
    # On the command line: the message and the fix, no traceback.
    from click.testing import CliRunner

    from study_app.cli import main

    result = CliRunner().invoke(
        main, ["study", "list", "--database-url", f"sqlite:///{tmp_path / 'c.sqlite3'}"]
    )
    assert result.exit_code == 1 and "PSTUDY_TRUSTED_PROXIES=1" in result.output
    assert "Traceback" not in result.output
