"""The pages under real gunicorn with several worker processes: a researcher's session
and CSRF tokens hold across workers, a participant completes a study in Chromium, and
the dashboard (served by whichever worker) sees it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.support import free_port
from tests.test_browser_participant import TIMEOUT_MS, answer, answer_practice, wait_trial
from tests.test_pages_support import (
    ARTIFACTS,
    EMAIL,
    PASSWORD,
    import_set,
    make_researcher,
    make_study,
    votes_per_trial,
    write_stimulus_set,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]
PLANNED = 4 + 1 + 1


@pytest.fixture
def gunicorn_server(tmp_path):
    """gunicorn with 2 workers over a SQLite file prepared here; yields (base URL, app)."""
    from study_app import create_app
    from study_app.extensions import db

    url = f"sqlite:///{tmp_path / 'served.sqlite3'}"
    app = create_app({"SQLALCHEMY_DATABASE_URI": url, "SECRET_KEY": "shared-by-workers"})
    with app.app_context():
        db.create_all()
    port = free_port()
    env = dict(
        os.environ,
        DATABASE_URL=url,
        SECRET_KEY="shared-by-workers",
        PSTUDY_DASHBOARD_REFRESH_MS="500",
    )
    gunicorn = Path(sys.executable).with_name("gunicorn")
    process = subprocess.Popen(
        [
            str(gunicorn),
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "2",
            "--threads",
            "2",
            "--worker-class",
            "gthread",
            "study_app:create_app()",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(base + "/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # not listening or still booting
                pass
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "gunicorn did not start in 30 s"
            time.sleep(0.2)
        yield base, app
    finally:
        process.terminate()
        process.wait(timeout=20)
        with app.app_context():
            db.engine.dispose()


def test_pages_work_across_gunicorn_workers(gunicorn_server, browser, tmp_path):
    base, app = gunicorn_server
    owner = make_researcher(app)
    set_id = import_set(app, write_stimulus_set(tmp_path / "set"), owner=owner)
    study = make_study(app, set_id, slug="served", owner=owner)

    researcher = browser.new_context(viewport={"width": 1280, "height": 900})
    participant = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = researcher.new_page()
        page.goto(f"{base}/login")
        page.fill("#email", EMAIL)
        page.fill("#password", PASSWORD)
        page.click("#login-button")
        page.wait_for_url(f"{base}/researcher/")
        # Each connection lands on whichever worker accepts it; all share the session.
        for _ in range(4):
            page.goto(f"{base}/researcher/studies/served")
            assert page.url == f"{base}/researcher/studies/served"
        pid = participant.new_page()
        pid.goto(f"{base}/s/served?PROLIFIC_PID=gunicorn1")
        pid.wait_for_selector("body[data-state='consent']", timeout=TIMEOUT_MS)
        pid.check("#consent-check")
        pid.click("#consent-button")
        pid.click("#start-button")
        wait_trial(pid)
        answer_practice(pid, lambda: pid.keyboard.press("f"))
        for number in range(PLANNED):
            wait_trial(pid)
            pid.wait_for_timeout(220)
            answer(pid, lambda n=number: pid.keyboard.press("jf"[n % 2]))
        pid.wait_for_selector("body[data-state='done']", timeout=TIMEOUT_MS)
        page.wait_for_function(
            "() => document.getElementById('n-completed').textContent === '1'", timeout=TIMEOUT_MS
        )
        assert page.inner_text("#n-responses") == str(PLANNED)
        ARTIFACTS.mkdir(exist_ok=True)  # an artifact only; docs/ has the dashboard already
        page.screenshot(path=str(ARTIFACTS / "gunicorn-dashboard.png"), full_page=True)
        # A form posted to whichever worker validates the CSRF token another one issued.
        page.click("#action-pause")
        page.wait_for_selector("#study-status:text('paused')")
    finally:
        researcher.close()
        participant.close()
    counts = votes_per_trial(app, study["id"])
    assert len(counts) == PLANNED and set(counts.values()) == {1}
