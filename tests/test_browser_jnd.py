"""The JND task in a real Chromium: the reference and a reconstruction one after the other
at the same place, each frame-timed and logged (requested and measured onsets/offsets), an
interval mask between them, "same" / "different" by keys (F / J) and by buttons, a reload
that resumes, and every answer stored exactly once with the timing the page measured."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from tests.test_browser_exposure import MEASURE_FRAME_PERIOD, TOLERANCE_MS
from tests.test_browser_participant import TIMEOUT_MS, answer, answer_practice, wait_trial
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


def _check_timing(timing: dict, period: float) -> None:
    """Each phase of the sequence within one frame of its request, in order."""
    assert timing["frame_period_ms"] == pytest.approx(period, rel=0.2)
    first = timing["exposure_offset_ms"] - timing["exposure_onset_ms"]
    isi = timing["second_onset_ms"] - timing["exposure_offset_ms"]
    second = timing["second_offset_ms"] - timing["second_onset_ms"]
    for measured, requested in ((first, FIRST_MS), (isi, ISI_MS), (second, SECOND_MS)):
        assert abs(measured - requested) <= timing["frame_period_ms"] + TOLERANCE_MS, timing
    assert (
        timing["exposure_requested_ms"],
        timing["isi_requested_ms"],
        timing["second_requested_ms"],
    ) == (FIRST_MS, ISI_MS, SECOND_MS)


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
    for row in votes:
        timing = logged[row.token]
        _check_timing(timing, period)
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
