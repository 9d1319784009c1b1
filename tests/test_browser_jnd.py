"""The JND task in a real Chromium: the reference and a reconstruction one after the other
at the same place, each frame-timed and logged (requested and measured onsets/offsets), an
interval mask between them, "same" / "different" by keys (F / J) and by buttons, a reload
that resumes, and every answer stored exactly once with the timing the page measured."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from tests.test_browser_exposure import MEASURE_FRAME_PERIOD, TOLERANCE_MS
from tests.test_browser_participant import (
    PHONE,
    TIMEOUT_MS,
    answer,
    answer_practice,
    consent_by_touch,
    wait_trial,
)
from tests.test_pages_support import import_set, make_study, votes_per_trial, write_stimulus_set

pytestmark = pytest.mark.browser

PLANNED = 4 + 1 + 1  # make_study's M main + 1 catch + 1 repeat
FIRST_MS, ISI_MS, SECOND_MS = 100, 50, 150

# What the sequence slot shows, in order: each child put there, with its time.
RECORD_SEQUENCE = """
window.__shown = [];
document.addEventListener("DOMContentLoaded", () => {
  const slot = document.getElementById("sequence-slot");
  new MutationObserver(() => {
    const child = slot.firstElementChild;
    window.__shown.push({tag: child ? child.tagName : null,
                         src: child && child.src ? new URL(child.src).pathname : null,
                         token: document.getElementById("trial-stage").dataset.token});
  }).observe(slot, {childList: true});
});
"""


def _check_timing(timing: dict, period: float) -> list[bool]:
    """Each phase of the sequence in order, never cut short (at least its frames − ½),
    the page's frame period that of the display; returns, per phase, whether it was
    within one frame of its request (a loaded machine can delay a frame now and then:
    the page then logs the longer phase, as the vote stores it)."""
    assert timing["frame_period_ms"] == pytest.approx(period, rel=0.2)
    frame = timing["frame_period_ms"]
    first = timing["exposure_offset_ms"] - timing["exposure_onset_ms"]
    isi = timing["second_onset_ms"] - timing["exposure_offset_ms"]
    second = timing["second_offset_ms"] - timing["second_onset_ms"]
    assert (timing["exposure_requested_ms"], timing["isi_requested_ms"],
            timing["second_requested_ms"]) == (FIRST_MS, ISI_MS, SECOND_MS)  # fmt: skip
    within = []
    for measured, requested in ((first, FIRST_MS), (isi, ISI_MS), (second, SECOND_MS)):
        frames = max(1, round(requested / frame))
        assert measured >= (frames - 0.5) * frame - TOLERANCE_MS, timing
        within.append(abs(measured - requested) <= frame + TOLERANCE_MS)
    assert timing["exposure_frames_measured"] == round(first / frame)
    assert timing["second_frames_measured"] == round(second / frame)
    return within


def test_jnd_flow_sequential_keys_and_buttons_reload_resumes_each_answer_stored_once(
    app, live_server, page, tmp_path
):
    from study_app.extensions import db
    from study_app.models import Trial, Vote

    set_id = import_set(app, write_stimulus_set(tmp_path / "set"))
    study = make_study(
        app,
        set_id,
        slug="jnd",
        task="jnd",
        first_ms=FIRST_MS,
        isi_ms=ISI_MS,
        second_ms=SECOND_MS,
        isi_mask="noise",
    )
    page.add_init_script(RECORD_SEQUENCE)
    page.goto(f"{live_server}/s/jnd")
    page.wait_for_selector("body[data-state='consent']", timeout=TIMEOUT_MS)
    period = page.evaluate(MEASURE_FRAME_PERIOD)
    page.check("#consent-check")
    page.click("#consent-button")
    assert "F / ←" in page.inner_text("#screen-instructions")
    assert "“Same”" in page.inner_text("#screen-instructions")
    page.click("#start-button")
    wait_trial(page)
    assert page.inner_text("#question") == "Were the two images the same or different?"
    assert (page.inner_text("#left-label"), page.inner_text("#right-label")) == (
        "Same",
        "Different",
    )
    answer_practice(page, lambda: page.click("#choice-left"))

    pressed: dict[str, str] = {}  # trial token -> the answer given
    logged: dict[str, dict] = {}

    def respond(how: str) -> None:
        token = wait_trial(page)
        logged[token] = json.loads(page.get_attribute("#trial-stage", "data-exposure"))
        action = {
            "F": lambda: page.keyboard.press("f"),
            "J": lambda: page.keyboard.press("j"),
            "same": lambda: page.click("#choice-left"),
            "different": lambda: page.click("#choice-right"),
        }[how]
        pressed[token] = {"F": "same", "J": "different"}.get(how, how)
        answer(page, action)

    respond("F")
    respond("different")
    page.wait_for_function("() => document.body.dataset.outbox === '0'", timeout=TIMEOUT_MS)
    shown = page.evaluate("window.__shown")
    page.reload()  # resumes at the next unanswered trial, no consent or practice again
    assert wait_trial(page) not in pressed
    assert page.inner_text("#progress-label") == f"2 / {PLANNED}"
    for how in ("J", "same", "F", "J"):
        respond(how)
    page.wait_for_selector("body[data-state='done']", timeout=TIMEOUT_MS)
    shown += page.evaluate("window.__shown")

    counts = votes_per_trial(app, study["id"])
    assert len(counts) == PLANNED and set(counts.values()) == {1}
    with app.app_context():
        votes = db.session.execute(
            select(Trial.token, Trial.kind, Trial.left_sha256, Trial.right_sha256, Vote)
            .join(Vote, Vote.trial_id == Trial.id)
            .where(Trial.preview.is_(False))
        ).all()
    assert {row.token: row.Vote.choice for row in votes} == pressed
    within = []
    for row in votes:
        timing = logged[row.token]
        within += _check_timing(timing, period)
        assert {name: getattr(row.Vote, name) for name in timing} == timing
        # the slot showed the first image, the noise mask, the second image, the mask
        sequence = [s for s in shown if s["token"] == row.token]
        assert [s["tag"] for s in sequence[-4:]] == ["IMG", "CANVAS", "IMG", "CANVAS"]
        assert sequence[-4]["src"] == f"/media/{row.left_sha256}.png"
        assert sequence[-2]["src"] == f"/media/{row.right_sha256}.png"
        if row.kind == "catch":  # the reference twice
            assert row.left_sha256 == row.right_sha256
        else:
            assert row.left_sha256 != row.right_sha256
    # 18 phases: within one frame of the request (all of them on an idle machine)
    assert sum(within) >= 0.8 * len(within), within


def test_sequential_2afc_on_a_phone_asks_first_or_second_and_takes_taps(
    app, browser, live_server, tmp_path
):
    """A sequential 2AFC study on a touch screen: the buttons say First / Second, a tap
    answers (stored as left = first, right = second), each with its sequence's timing."""
    from study_app.extensions import db
    from study_app.models import Vote

    set_id = import_set(app, write_stimulus_set(tmp_path / "set"))
    study = make_study(app, set_id, slug="seq", presentation="sequential", first_ms=50,
                       isi_ms=0, second_ms=50, isi_mask="none", question_mode="no-reference",
                       practice_trials=0, trials_per_participant=2, catch_trials=0,
                       repeat_trials=0)  # fmt: skip
    context = browser.new_context(**PHONE)
    page = context.new_page()
    try:
        consent_by_touch(page, f"{live_server}/s/seq")
        assert page.is_visible("text=Answer by tapping a button.")
        assert not page.is_visible("kbd")
        page.tap("#start-button")
        wait_trial(page)
        assert page.inner_text("#question") == (
            "Which image looked better: the first or the second?"
        )
        assert (page.inner_text("#left-label"), page.inner_text("#right-label")) == (
            "First", "Second")  # fmt: skip
        box = page.locator("#choice-right").bounding_box()
        assert box["height"] >= 48 and box["width"] >= 48  # a finger-sized target
        logged = []
        for target in ("#choice-right", "#choice-left"):
            wait_trial(page)
            logged.append(json.loads(page.get_attribute("#trial-stage", "data-exposure")))
            answer(page, lambda target=target: page.tap(target))
        page.wait_for_selector("body[data-state='done']", timeout=TIMEOUT_MS)
    finally:
        context.close()
    with app.app_context():
        votes = db.session.scalars(
            select(Vote).where(Vote.study_id == study["id"]).order_by(Vote.trial_index)
        ).all()
    assert [vote.choice for vote in votes] == ["right", "left"]
    for vote, timing in zip(votes, logged, strict=True):
        assert vote.isi_requested_ms == 0
        assert vote.second_onset_ms == timing["exposure_offset_ms"]  # no interval: at once
        assert {name: getattr(vote, name) for name in timing} == timing
