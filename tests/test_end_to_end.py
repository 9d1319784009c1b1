"""The whole loop as a new user runs it: ``pstudy demo`` at smoke size.

generate → create study → serve under gunicorn → synthetic participants vote over HTTP →
export → analyse; then the report's numbers are checked against the votes read straight
from the database (plain SQL, not the app's export), the demo is run again on the same
folder, stopped with Ctrl-C, and run on PostgreSQL with a folder of the user's images.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import sqlalchemy as sa
from PIL import Image

from tests.support import free_port
from tests.test_browser_participant import answer, wait_trial
from tests.test_pages_support import save_screenshot

pytestmark = pytest.mark.slow

DEMO_TIMEOUT_S = 600
N_SIMULATED = 6
BROWSER_TIMEOUT_MS = 30_000


# smoke in CI; `PSTUDY_E2E_PRESET=demo PSTUDY_UPDATE_SCREENSHOTS=1` refreshes the README's
# demo-*.png screenshots from the real demo stimulus set.
PRESET = os.environ.get("PSTUDY_E2E_PRESET", "smoke")


def demo_command(out: Path, port: int, *extra: str) -> list[str]:
    """``pstudy demo`` at ``PRESET`` size on ``port``, one training thread."""
    return [sys.executable, "-m", "study_app", "demo", "--out", str(out), "--preset", PRESET,
            "--threads", "1", "--port", str(port), "--workers", "2", *extra]


def run_demo(out: Path, *extra: str, env: dict[str, str] | None = None):
    """Run the demo to completion (no terminal, so it stops serving at the end)."""
    port = free_port()
    completed = subprocess.run(
        demo_command(out, port, *extra), capture_output=True, text=True,
        stdin=subprocess.DEVNULL, timeout=DEMO_TIMEOUT_S,
        env=env or dict(os.environ, DATABASE_URL=""),
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    return completed, port


def port_answers(port: int) -> bool:
    try:
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
    except requests.RequestException:
        return False
    return True


def read_table(report: Path, name: str) -> pd.DataFrame:
    """One report table (its CSV starts with a '#' provenance line)."""
    return pd.read_csv(report / "tables" / f"{name}.csv")


def main_votes_from_database(url: str, slug: str) -> pd.DataFrame:
    """Every main-trial vote of ``slug``, read with plain SQL: left, right, chosen."""
    engine = sa.create_engine(url)
    query = sa.text(
        "SELECT p.public_id AS participant, t.condition_left AS left_condition, "
        "t.condition_right AS right_condition, v.chosen_condition AS chosen "
        "FROM vote v JOIN trial t ON t.id = v.trial_id "
        "JOIN participant p ON p.id = v.participant_id "
        "JOIN study s ON s.id = v.study_id WHERE s.slug = :slug AND t.kind = 'main'"
    )
    with engine.connect() as connection:
        votes = pd.read_sql(query, connection, params={"slug": slug})
    engine.dispose()
    return votes


def pair_counts(votes: pd.DataFrame) -> dict[frozenset, dict[str, int]]:
    """Per unordered condition pair: the number of votes and the wins of each condition."""
    counts: dict[frozenset, dict[str, int]] = {}
    for row in votes.itertuples():
        pair = frozenset((row.left_condition, row.right_condition))
        entry = counts.setdefault(pair, {"n": 0, **{c: 0 for c in pair}})
        entry["n"] += 1
        entry[row.chosen] += 1
    return counts


def studies_in(url: str) -> pd.DataFrame:
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        studies = pd.read_sql(sa.text(
            "SELECT s.slug, s.status, "
            "(SELECT count(*) FROM vote v WHERE v.study_id = s.id) AS votes, "
            "(SELECT coalesce(sum(i.n_votes), 0) FROM item i WHERE i.study_id = s.id) "
            "AS main_votes FROM study s ORDER BY s.id"), connection)
    engine.dispose()
    return studies


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    completed, port = run_demo(out, "--simulate", str(N_SIMULATED))
    return out, completed, port


def simulated_slug(out: Path) -> str:
    (run,) = (out / "runs").iterdir()
    return run.name


def test_demo_runs_the_whole_loop_and_the_report_matches_the_database(demo_run):
    out, completed, port = demo_run
    slug = simulated_slug(out)
    live_slug = slug.removesuffix("-simulated")
    url = f"sqlite:///{out / 'study.sqlite3'}"

    # What it printed: the links a user needs, the login, the report.
    assert f"http://127.0.0.1:{port}/s/{live_slug}" in completed.stdout
    password = (out / "researcher-password.txt").read_text().strip()
    assert "researcher@example.org" in completed.stdout and password in completed.stdout
    report = out / "runs" / slug / "report"
    assert str(report / "report.html") in completed.stdout
    for step in ("1/5 generate", "2/5 create", "3/5 serve", "4/5", "5/5 export"):
        assert step in completed.stderr

    # The stimulus set, the study on SQLite, the server gone afterwards.
    manifest = json.loads((out / "stimuli" / "manifest.json").read_text())
    assert manifest["conditions"]
    studies = studies_in(url).set_index("slug")
    assert studies.loc[live_slug, "status"] == "live" and studies.loc[live_slug, "votes"] == 0
    assert studies.loc[slug, "votes"] > 0
    assert not port_answers(port)

    # The report's numbers are the database's votes.
    votes = main_votes_from_database(url, slug)
    assert len(votes) == studies.loc[slug, "main_votes"] > 0
    expected = pair_counts(votes)
    everyone = read_table(report, "pairs_everyone")
    assert len(everyone) == len(expected)
    for row in everyone.itertuples():
        counts = expected[frozenset((row.condition_a, row.condition_b))]
        assert row.n == counts["n"]
        assert row.wins_a == counts[row.condition_a]
        assert row.rate_a == pytest.approx(counts[row.condition_a] / counts["n"])

    participants = read_table(report, "participants")
    assert len(participants) == N_SIMULATED
    kept = set(participants.loc[~participants["excluded"], "participant"].astype(str))
    expected_kept = pair_counts(votes[votes["participant"].isin(kept)])
    for row in read_table(report, "pairs").itertuples():
        counts = expected_kept[frozenset((row.condition_a, row.condition_b))]
        assert (row.n, row.wins_a) == (counts["n"], counts[row.condition_a])

    html = (report / "report.html").read_text()
    assert "<img" in html and all(c["name"] in html for c in manifest["conditions"])
    provenance = json.loads((report / "provenance.json").read_text())
    assert provenance["inputs"][1]["manifest_sha256"] == manifest_sha256(out / "stimuli")
    assert any((report / "figures").glob("*.png"))


def manifest_sha256(stimuli: Path) -> str:
    import hashlib

    return hashlib.sha256((stimuli / "manifest.json").read_bytes()).hexdigest()


def test_demo_runs_again_on_the_same_folder(demo_run):
    out, _, _ = demo_run
    password = (out / "researcher-password.txt").read_text()
    manifest_before = (out / "stimuli" / "manifest.json").read_bytes()

    completed, _ = run_demo(out, "--serve-for", "0")

    assert "(reused)" in completed.stdout + completed.stderr
    assert (out / "stimuli" / "manifest.json").read_bytes() == manifest_before
    assert (out / "researcher-password.txt").read_text() == password
    live = studies_in(f"sqlite:///{out / 'study.sqlite3'}").query("status == 'live'")
    assert len(live) == 3  # first run: live + simulated; this run: one more live study


def answer_practice_trials(page) -> None:
    """Answer practice trials (feedback, never stored), then start the real trials from
    the screen that follows practice."""
    while True:
        wait_trial(page)
        if not page.is_visible("#practice-badge"):
            return  # a study without practice
        label = page.inner_text("#progress-label")
        page.keyboard.press("f")
        page.wait_for_function(
            "old => document.body.dataset.state === 'main-start' || "
            "document.getElementById('progress-label').innerText !== old",
            arg=label, timeout=BROWSER_TIMEOUT_MS,
        )
        if page.evaluate("document.body.dataset.state") == "main-start":
            page.click("#start-main-button")
            return

@pytest.mark.browser
def test_a_person_votes_and_the_researcher_logs_in_then_ctrl_c_stops_the_demo(demo_run, page):
    """The printed participant link and login work in Chromium against the demo's
    gunicorn (secure cookie over http://127.0.0.1), then Ctrl-C stops everything."""
    out, _, _ = demo_run
    port = free_port()
    demo = subprocess.Popen(demo_command(out, port, "--serve-for", "600"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, DATABASE_URL=""),
                            # as in a terminal, even when the test run itself was started in
                            # the background (where SIGINT is inherited as ignored)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    base = f"http://127.0.0.1:{port}"
    url = f"sqlite:///{out / 'study.sqlite3'}"
    try:
        deadline = time.monotonic() + 120
        while not port_answers(port):
            assert demo.poll() is None, demo.stdout.read()
            assert time.monotonic() < deadline, "the demo server never answered"
            time.sleep(0.5)
        slug = studies_in(url).query("status == 'live'")["slug"].iloc[-1]
        assert not slug.endswith("-simulated")

        # A participant: consent, instructions, the practice trials, then three votes.
        page.goto(f"{base}/s/{slug}")
        page.wait_for_selector("body[data-state='consent']", timeout=BROWSER_TIMEOUT_MS)
        page.check("#consent-check")
        page.click("#consent-button")
        page.wait_for_selector("body[data-state='instructions']", timeout=BROWSER_TIMEOUT_MS)
        page.click("#start-button")
        answer_practice_trials(page)
        for number, key in enumerate(["f", "j", "ArrowLeft"]):
            wait_trial(page)
            assert not page.is_visible("#practice-badge")
            if number == 0:
                save_screenshot(page, "demo-participant-trial")
            page.wait_for_timeout(400)  # a person looks first (faster than 200 ms is flagged)
            answer(page, lambda key=key: page.keyboard.press(key))
        assert studies_in(url).set_index("slug").loc[slug, "votes"] == 3

        # The researcher: the printed e-mail and password open the study's dashboard.
        password = (out / "researcher-password.txt").read_text().strip()
        page.goto(f"{base}/researcher/studies/{slug}")
        page.fill("#email", "researcher@example.org")
        page.fill("#password", password)
        page.click("#login-button")
        page.wait_for_selector("#n-responses", timeout=BROWSER_TIMEOUT_MS)
        assert page.inner_text("#n-responses") == "3"
        save_screenshot(page, "demo-researcher-dashboard")

        demo.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends
        output, _ = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 0, output[-3000:]
    assert "server stopped" in output
    assert not port_answers(port)


@pytest.mark.postgres
def test_demo_on_postgresql_with_a_folder_of_images(tmp_path, postgres_url):
    from skimage import data

    photos = tmp_path / "my photos"
    photos.mkdir()
    for name in ("camera", "coins", "moon"):
        array = getattr(data, name)()
        Image.fromarray(np.asarray(array)).convert("RGB").save(photos / f"{name}.png")

    out = tmp_path / "demo"
    run_demo(out, "--data", str(photos), "--database-url", postgres_url,
             "--simulate", "4")

    manifest = json.loads((out / "stimuli" / "manifest.json").read_text())
    assert manifest["provenance"]["config"]["data"]["source"] == str(photos)
    assert {image["id"] for image in manifest["images"]} <= {"camera", "coins", "moon"}
    assert not (out / "study.sqlite3").exists()
    studies = studies_in(postgres_url)
    assert len(studies) == 2 and studies["votes"].sum() > 0
    slug = simulated_slug(out)
    votes = main_votes_from_database(postgres_url, slug)
    report = out / "runs" / slug / "report"
    assert read_table(report, "pairs_everyone")["n"].sum() == len(votes)
