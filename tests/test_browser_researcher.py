"""A researcher in Chromium: logs in, creates and launches a study, watches the dashboard
update while a participant votes in another window, previews, and downloads the export."""

from __future__ import annotations

import io

import pandas as pd
import pytest

from tests.test_browser_participant import TIMEOUT_MS, answer, wait_trial
from tests.test_pages_support import (
    EMAIL,
    PASSWORD,
    import_set,
    make_researcher,
    save_screenshot,
    votes_per_trial,
    write_stimulus_set,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_researcher_creates_launches_watches_and_downloads(
    app, browser, live_server, page, tmp_path
):
    import_set(app, write_stimulus_set(tmp_path / "set"), owner=make_researcher(app))
    app.config["DASHBOARD_REFRESH_MS"] = 400

    page.goto(f"{live_server}/researcher/")
    assert page.url.startswith(f"{live_server}/login?next=")
    save_screenshot(page, "researcher-login")
    page.fill("#email", EMAIL)
    page.fill("#password", "wrong")
    page.click("#login-button")
    assert "Wrong e-mail or password" in page.inner_text("#login-error")
    page.fill("#email", EMAIL)
    page.fill("#password", PASSWORD)
    page.click("#login-button")
    page.wait_for_url(f"{live_server}/researcher/")
    save_screenshot(page, "researcher-studies")

    page.click("text=New study")
    page.fill("#title", "Which loss looks best?")
    page.fill("#slug", "browser-study")
    page.fill("#votes_per_item", "2")
    page.fill("#trials_per_participant", "3")
    page.fill("#catch_trials", "0")
    page.fill("#repeat_trials", "0")
    page.fill("#practice_trials", "0")
    page.fill("#completion_code", "DONE-1")
    save_screenshot(page, "researcher-new-study")
    page.click("#create-study")
    page.wait_for_url(f"{live_server}/researcher/studies/browser-study")
    assert page.inner_text("#study-status") == "draft"

    # Preview as a participant (a second tab with the same session), nothing counted.
    with page.context.expect_page() as preview_info:
        page.click("#preview-link", modifiers=["Control"])
    preview = preview_info.value
    preview.wait_for_selector("body[data-state='consent']", timeout=TIMEOUT_MS)
    assert preview.get_attribute("#participant-app", "data-preview") == "true"
    preview.close()

    page.click("#action-start")
    page.wait_for_selector("#study-status:text('live')")
    assert page.inner_text("#n-responses") == "0"

    # A participant in a separate browser context (no researcher cookie) votes.
    participant_context = browser.new_context(viewport={"width": 1024, "height": 768})
    participant = participant_context.new_page()
    try:
        participant.goto(page.get_attribute("#participant-link", "href"))
        participant.wait_for_selector("body[data-state='consent']", timeout=TIMEOUT_MS)
        participant.check("#consent-check")
        participant.click("#consent-button")
        participant.click("#start-button")
        for number in range(3):
            wait_trial(participant)
            participant.wait_for_timeout(300)  # slower than the 200 ms too-fast rule
            answer(participant, lambda n=number: participant.keyboard.press("fj"[n % 2]))
            # The dashboard, left open, shows each vote without a reload.
            page.wait_for_function(
                "n => document.getElementById('n-responses').textContent === String(n)",
                arg=number + 1,
                timeout=TIMEOUT_MS,
            )
        participant.wait_for_selector("body[data-state='done']", timeout=TIMEOUT_MS)
        assert participant.inner_text("#completion-code") == "DONE-1"
    finally:
        participant_context.close()
    page.wait_for_function(
        "() => document.getElementById('n-completed').textContent === '1'", timeout=TIMEOUT_MS
    )
    page.wait_for_function(
        "() => !document.getElementById('preference-plot').hidden "
        "&& document.getElementById('preference-plot').naturalWidth > 0",
        timeout=TIMEOUT_MS,
    )
    assert page.locator("#preference tbody tr").count() >= 1
    assert page.inner_text("#votes-total") == "3"
    assert page.inner_text("#n-excluded") == "0"
    save_screenshot(page, "researcher-dashboard")

    with page.expect_download() as download_info:
        page.click("#download-csv")
    download = download_info.value
    assert download.suggested_filename == "browser-study-responses.csv"
    responses = pd.read_csv(io.BytesIO(open(download.path(), "rb").read()))
    assert len(responses) == 3 and set(responses["trial_kind"]) == {"main"}
    assert responses["choice"].tolist() == ["left", "right", "left"]
    from sqlalchemy import select

    from study_app.extensions import db
    from study_app.models import Study

    with app.app_context():
        study_id = db.session.scalars(select(Study.id).where(Study.slug == "browser-study")).one()
    assert sorted(votes_per_trial(app, study_id).values()) == [1, 1, 1]

    page.click("#logout-button")
    page.wait_for_url(f"{live_server}/login")
    page.goto(f"{live_server}/researcher/studies/browser-study/responses.csv")
    assert page.url.startswith(f"{live_server}/login")


def test_dashboard_panels_agree_after_an_exclusion_and_list_prolific_actions(
    app, live_server, page, tmp_path
):
    """Every panel comes from one snapshot: when a participant who voted withdraws (and so
    stops counting), the counts, the exclusion reasons, the preference table, the plot
    and the participant list all change together without a reload; the participant
    list's Prolific lists hold the right IDs."""
    from tests.study_support import Participant, vote_body
    from tests.test_pages_support import make_study

    owner = make_researcher(app)
    set_id = import_set(app, write_stimulus_set(tmp_path / "set"), owner=owner)
    make_study(app, set_id, slug="agree", owner=owner, practice_trials=0, catch_trials=0,
               repeat_trials=0, trials_per_participant=3)
    app.config["DASHBOARD_REFRESH_MS"] = 300
    client = app.test_client()
    start = client.post("/api/v1/studies/agree/participants", json={"prolific_pid": "PIDLEAVES"})
    token = start.get_json()["participant"]["token"]
    headers = {"Authorization": f"Bearer {token}"}
    trials = client.post("/api/v1/participant/trials/next", headers=headers).get_json()["trials"]
    for trial in trials:
        assert client.post("/api/v1/participant/votes", headers=headers,
                           json=vote_body(trial["token"], "left")).status_code == 200

    page.goto(f"{live_server}/login")
    page.fill("#email", EMAIL)
    page.fill("#password", PASSWORD)
    page.click("#login-button")
    page.goto(f"{live_server}/researcher/studies/agree")
    page.wait_for_function(
        "() => !document.getElementById('preference-plot').hidden "
        "&& document.getElementById('preference-plot').naturalWidth > 0", timeout=TIMEOUT_MS)
    assert "PIDLEAVES" in page.inner_text("#participant-list")
    assert page.inner_text("#n-excluded") == "0"
    assert "Still needed" in page.inner_text("#estimate")
    plot_before = page.get_attribute("#preference-plot", "src")

    # the participant withdraws: returned participants don't count (the study's rule)
    assert client.post("/api/v1/participant/finish", headers=headers,
                       json={"status": "returned"}).status_code == 200
    page.wait_for_function(
        "() => document.getElementById('n-excluded').textContent === '1'", timeout=TIMEOUT_MS)
    state = page.evaluate("""() => ({
        reasons: document.getElementById('exclusion-reasons').textContent,
        preference: document.querySelector('#preference tbody').textContent,
        plotHidden: document.getElementById('preference-plot').hidden,
        returned: document.getElementById('n-returned').textContent,
        list: document.getElementById('participant-list').textContent,
    })""")
    assert state["reasons"] == "returned: 1" and state["returned"] == "1"
    assert "No votes yet." in state["preference"] and state["plotHidden"] is True
    assert "returned" in state["list"] and "none" in state["list"]
    save_screenshot(page, "researcher-dashboard-after-exclusion")

    # a participant who completes is listed to approve
    stays = Participant(client, "agree", prolific_pid="PIDSTAYS")
    stays.complete(lambda trial: "right")
    assert stays.finish().status_code == 200
    page.wait_for_function(
        "() => document.getElementById('participant-list').textContent.includes('approve')",
        timeout=TIMEOUT_MS)
    assert page.get_attribute("#preference-plot", "src") != plot_before
    with page.expect_download() as approve:
        page.click("#prolific-approve")
    assert open(approve.value.path()).read() == "PIDSTAYS\n"
    with page.expect_download() as listing:
        page.click("#participants-csv")
    people = pd.read_csv(listing.value.path(), keep_default_na=False)
    assert dict(zip(people["prolific_pid"], people["suggested_action"], strict=True)) == {
        "PIDLEAVES": "none", "PIDSTAYS": "approve"}


def test_the_active_panel_follows_the_votes_and_says_why_main_trials_stopped(
    app, live_server, page, tmp_path
):
    """An active study with a vote budget of 4: the dashboard, left open, updates the
    precision panel as votes arrive and shows the stop and its reason without a reload."""
    from study_app.extensions import db
    from study_app.models import StimulusSet
    from study_app.studies import create_study, parse_config, set_status
    from tests.study_support import Participant

    owner = make_researcher(app)
    set_id = import_set(app, write_stimulus_set(tmp_path / "set"), owner=owner)
    app.config["DASHBOARD_REFRESH_MS"] = 300
    with app.app_context():
        study = create_study(db.session.get(StimulusSet, set_id), parse_config({
            "title": "Active", "slug": "active", "design": "active", "vote_budget": 4,
            "posterior_every": 1, "catch_trials": 0, "repeat_trials": 0,
            "trials_per_participant": 4}), researcher_id=owner)
        set_status(study, "live")
        db.session.commit()
    page.goto(f"{live_server}/login")
    page.fill("#email", EMAIL)
    page.fill("#password", PASSWORD)
    page.click("#login-button")
    page.wait_for_url(f"{live_server}/researcher/")
    page.goto(f"{live_server}/researcher/studies/active")
    assert page.locator("#active-precision tbody tr").count() == 3
    # K is a cap in an active design, and the votes panel says so (not "of K wanted")
    votes_card = page.locator("section.card", has=page.locator("#pair-progress"))
    assert "cap K =" in votes_card.locator("h2").inner_text()
    assert "K is a cap, not a target" in votes_card.inner_text()
    assert page.is_hidden("#main-closed")
    assert Participant(app.test_client(), "active").complete() == 4
    page.wait_for_function(
        "() => !document.getElementById('main-closed').hidden", timeout=TIMEOUT_MS
    )
    assert "vote budget reached: 4 main votes" in page.inner_text("#main-closed")
    assert page.inner_text("#active-remaining") == "0"
    assert page.inner_text("#active-votes") == "4" and page.inner_text("#posterior-votes") == "4"
    assert page.inner_text("#estimate").startswith("Active design: main trials stop")
    save_screenshot(page, "researcher-dashboard-active")
