"""The display step in a real Chromium: the card calibration driven by keyboard and by a
dragged handle gives the px/mm the outline really measures; the blind-spot sweeps give the
viewing distance; a page scaled by 1.25 is refused when the study requires unscaled
stimuli (and the same study runs at 1); leaving fullscreen pauses the study without
losing or duplicating a vote.

Headless Chromium enters and leaves fullscreen for real (``requestFullscreen`` after a
click, ``document.exitFullscreen``), so the pause is driven through the browser's own
``fullscreenchange`` events, not simulated ones.
"""

from __future__ import annotations

import math

import pytest
from sqlalchemy import select

from tests.test_browser_participant import PLANNED, TIMEOUT_MS, answer, wait_trial
from tests.test_pages_support import (
    import_set,
    make_study,
    save_screenshot,
    votes_per_trial,
    write_stimulus_set,
)

pytestmark = pytest.mark.browser

BLIND_SPOT_TARGET_PX = 300.0  # where the scripted participant "sees" the dot vanish


def participant_row(app, study_id: int):
    from study_app.extensions import db
    from study_app.models import Participant

    with app.app_context():
        return db.session.scalars(
            select(Participant).where(Participant.study_id == study_id)
        ).one_or_none()


def start(page, url: str) -> None:
    """Consent and instructions, up to the display step."""
    page.goto(url)
    page.wait_for_selector("body[data-state='consent']", timeout=TIMEOUT_MS)
    page.check("#consent-check")
    page.click("#consent-button")
    page.wait_for_selector("body[data-state='instructions']", timeout=TIMEOUT_MS)
    page.click("#start-button")


def answer_the_rest(app, page, study_id: int, answered: int) -> None:
    """Answer the trials left after ``answered``, then check every vote is stored once."""
    for _ in range(PLANNED - answered):
        wait_trial(page)
        answer(page, lambda: page.keyboard.press("j"))
    page.wait_for_selector("body[data-state='done']", timeout=TIMEOUT_MS)
    stored = votes_per_trial(app, study_id)
    assert len(stored) == PLANNED and set(stored.values()) == {1}


def outline_width(page) -> float:
    return page.eval_on_selector("#card-outline", "el => el.getBoundingClientRect().width")


def test_card_and_blind_spot_calibration_give_the_measured_px_per_mm_and_distance(
    app, live_server, page, tmp_path
):
    set_id = import_set(app, write_stimulus_set(tmp_path / "set"))
    study = make_study(
        app, set_id, slug="cal", calibration={"mode": "required", "viewing_distance": "required"}
    )
    start(page, f"{live_server}/s/cal")
    page.wait_for_selector("body[data-state='calibration-card']", timeout=TIMEOUT_MS)
    assert not page.is_visible("#card-skip")  # required: no way around it
    width0 = outline_width(page)
    assert width0 == round(85.6 * 96 / 25.4)  # starts near 96 dpi
    # keyboard: the slider moves in half-pixel steps, the buttons by one pixel
    page.focus("#card-size")
    for _ in range(4):
        page.keyboard.press("ArrowRight")
    page.focus("#card-larger")
    page.keyboard.press("Enter")
    assert outline_width(page) == pytest.approx(width0 + 3, abs=0.01)
    # mouse: drag the corner handle 77 px to the right
    handle = page.locator("#card-handle").bounding_box()
    x, y = handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 40, y + 5, steps=4)
    page.mouse.move(x + 77, y + 9, steps=4)
    page.mouse.up()
    expected = width0 + 3 + 77
    matched = outline_width(page)
    assert matched == pytest.approx(expected, abs=0.01)
    height = page.eval_on_selector("#card-outline", "el => el.getBoundingClientRect().height")
    assert matched / height == pytest.approx(85.60 / 53.98, rel=1e-3)  # an ID-1 card's shape
    save_screenshot(page, "participant-calibration-card")
    page.click("#card-done")

    page.wait_for_selector("body[data-state='calibration-distance']", timeout=TIMEOUT_MS)
    page.click("#distance-start")
    for sweep in (1, 2, 3):
        page.wait_for_function(
            "([n, target]) => { const a = document.getElementById('blind-spot-area');"
            " return a.dataset.sweep === String(n) && parseFloat(a.dataset.offset) >= target; }",
            arg=[sweep, BLIND_SPOT_TARGET_PX],
            polling="raf",
            timeout=TIMEOUT_MS,
        )
        if sweep == 1:
            save_screenshot(page, "participant-calibration-distance")
        page.keyboard.press("Space")
    wait_trial(page)  # the display passed: on to the practice trial
    assert page.is_visible("#practice-badge")

    row = participant_row(app, study["id"])
    px_mm = expected / 85.60
    assert row.display_status == "passed" and row.display_attempts == 1
    assert row.px_per_mm == pytest.approx(px_mm, rel=0.01)  # the 1 %
    assert row.card_width_px == pytest.approx(expected, abs=0.01)
    # the mean of the three sweeps as the page showed them when the key landed (the dot
    # moves on, 50 mm/s ≈ 236 px/s here, while the key is on its way)
    measured = [float(x) for x in page.get_attribute("#blind-spot-area", "data-measured").split()]
    assert len(measured) == 3 and min(measured) >= BLIND_SPOT_TARGET_PX
    assert row.blind_spot_px == pytest.approx(sum(measured) / 3, abs=0.002)
    distance = row.blind_spot_px / px_mm / math.tan(math.radians(13.5))
    assert row.viewing_distance_mm == pytest.approx(distance)
    assert row.px_per_deg == pytest.approx(2 * distance * math.tan(math.radians(0.5)) * px_mm)
    assert row.display_dpr == 1 and row.display_scaling_ok is True
    assert row.display_screen_w == 1280 and row.display_zoom == 1.0


@pytest.mark.parametrize("scale", [1.25, 1])
def test_a_scaled_page_is_refused_when_the_study_requires_unscaled_stimuli(
    app, browser, live_server, tmp_path, scale
):
    set_id = import_set(app, write_stimulus_set(tmp_path / "set"))
    study = make_study(app, set_id, slug="crisp", calibration={"require_unscaled": True})
    context = browser.new_context(
        viewport={"width": 1280, "height": 800}, device_scale_factor=scale
    )
    page = context.new_page()
    asked_for_trials = []
    page.on("request", lambda r: asked_for_trials.append(r.url) if "trials/next" in r.url else None)
    try:
        start(page, f"{live_server}/s/crisp")
        if scale == 1:
            wait_trial(page)
            row = participant_row(app, study["id"])
            assert row.display_status == "passed" and row.display_dpr == 1
            return
        page.wait_for_selector("body[data-state='display-refused']", timeout=TIMEOUT_MS)
        problem = page.inner_text("#display-problems")
        assert "device pixel ratio 1.25" in problem and "Ctrl+0" in problem
        save_screenshot(page, "participant-display-refused")
        page.click("#display-retry")  # nothing changed: refused again
        page.wait_for_selector("body[data-state='display-refused']", timeout=TIMEOUT_MS)
        assert not page.is_visible("#trial-stage")
        # the page sent nothing the server would have to refuse, and fetched no trial
        assert participant_row(app, study["id"]).display_attempts == 0
        assert asked_for_trials == []
    finally:
        context.close()


def test_leaving_fullscreen_pauses_the_study_and_no_vote_is_lost_or_doubled(
    app, live_server, page, tmp_path
):
    set_id = import_set(app, write_stimulus_set(tmp_path / "set"))
    study = make_study(
        app, set_id, slug="full", practice_trials=0, calibration={"require_fullscreen": True}
    )
    start(page, f"{live_server}/s/full")
    page.wait_for_selector("body[data-state='fullscreen']", timeout=TIMEOUT_MS)
    page.click("#fullscreen-button")
    wait_trial(page)
    assert page.evaluate("Boolean(document.fullscreenElement)")
    answer(page, lambda: page.keyboard.press("f"))
    token = wait_trial(page)

    page.evaluate("document.exitFullscreen()")
    page.wait_for_selector("body[data-paused='fullscreen']", timeout=TIMEOUT_MS)
    assert page.is_visible("#fullscreen-paused")
    save_screenshot(page, "participant-fullscreen-paused")
    # neither keys nor clicks reach the trial behind the pause
    page.keyboard.press("j")
    page.keyboard.press("ArrowLeft")
    box = page.locator("#choice-right").bounding_box()
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_timeout(300)
    assert page.get_attribute("#trial-stage", "data-token") == token
    assert len(votes_per_trial(app, study["id"])) == 1

    # keyboard only: the page behind is inert, so Tab reaches the pause's button only
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "fullscreen-return"
    page.keyboard.press("Enter")
    page.wait_for_function("() => !document.body.dataset.paused", timeout=TIMEOUT_MS)
    assert page.evaluate("Boolean(document.fullscreenElement)")
    assert page.get_attribute("#trial-stage", "data-token") == token  # the same trial resumes
    answer_the_rest(app, page, study["id"], answered=1)
    page.evaluate("document.exitFullscreen()")  # after the end: no pause
    page.wait_for_function("() => !document.fullscreenElement", timeout=TIMEOUT_MS)
    assert not page.is_visible("#fullscreen-paused")


def test_zooming_during_the_study_pauses_it_until_the_page_is_unscaled_again(
    app, live_server, page, tmp_path
):
    """The page passes the check at devicePixelRatio 1, then the display is rescaled to
    1.25 mid-study (Chromium's own device-metrics override, as a zoom or a move to another
    screen does): the study pauses with what to change; back at 1 it resumes, and every
    vote is stored once."""
    set_id = import_set(app, write_stimulus_set(tmp_path / "set"))
    study = make_study(
        app, set_id, slug="zoom", practice_trials=0, calibration={"require_unscaled": True}
    )
    start(page, f"{live_server}/s/zoom")
    wait_trial(page)
    answer(page, lambda: page.keyboard.press("f"))
    token = wait_trial(page)
    cdp = page.context.new_cdp_session(page)
    metrics = {"width": 1280, "height": 800, "mobile": False}
    cdp.send("Emulation.setDeviceMetricsOverride", {**metrics, "deviceScaleFactor": 1.25})
    page.wait_for_selector("body[data-paused='scaling']", timeout=TIMEOUT_MS)
    assert "device pixel ratio 1.25" in page.inner_text("#scaling-paused-message")
    page.keyboard.press("j")  # no answer while paused
    page.click("#scaling-check")  # still scaled: still paused
    page.wait_for_timeout(300)
    assert page.get_attribute("body", "data-paused") == "scaling"
    assert page.get_attribute("#trial-stage", "data-token") == token
    assert len(votes_per_trial(app, study["id"])) == 1
    cdp.send("Emulation.setDeviceMetricsOverride", {**metrics, "deviceScaleFactor": 1})
    page.wait_for_function("() => !document.body.dataset.paused", timeout=TIMEOUT_MS)
    answer_the_rest(app, page, study["id"], answered=1)
