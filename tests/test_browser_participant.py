"""A real Chromium takes part in studies: keyboard, mouse on a phone, reload, lost votes.

Every test ends by checking the database: one vote per answered trial, as many votes as
the study plans per participant, nothing duplicated.
"""

from __future__ import annotations

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from tests.test_pages_support import (
    import_set,
    make_study,
    save_screenshot,
    votes_per_trial,
    write_stimulus_set,
)

pytestmark = pytest.mark.browser

PLANNED = 4 + 1 + 1  # M main + 1 catch + 1 repeat (make_study's design)
TIMEOUT_MS = 30_000  # generous: CI machines are shared


@pytest.fixture
def study(app, tmp_path):
    set_id = import_set(app, write_stimulus_set(tmp_path / "set"))
    return make_study(app, set_id, slug="kbd")


def wait_trial(page) -> str:
    """Wait until a trial's images are on screen; return its token."""
    page.wait_for_selector("#trial-stage[data-ready='1']", timeout=TIMEOUT_MS)
    return page.get_attribute("#trial-stage", "data-token")


def answer(page, action) -> None:
    """Do ``action`` (a key press or click) and wait for the next trial or the end."""
    token = page.get_attribute("#trial-stage", "data-token")
    action()
    page.wait_for_function(
        "old => ['done', 'waiting'].includes(document.body.dataset.state) || "
        "(document.getElementById('trial-stage').dataset.ready === '1' && "
        "document.getElementById('trial-stage').dataset.token !== old)",
        arg=token,
        timeout=TIMEOUT_MS,
    )


def answer_practice(page, action) -> None:
    """Answer the (one) practice trial, then start the real trials from the screen that
    follows practice."""
    action()
    page.wait_for_selector("body[data-state='main-start']", timeout=TIMEOUT_MS)
    page.click("#start-main-button")


PHONE = {  # a phone-sized touch screen (browser.new_context(**PHONE))
    "viewport": {"width": 390, "height": 740},
    "device_scale_factor": 3,
    "is_mobile": True,
    "has_touch": True,
}


def consent_by_touch(page, url: str) -> None:
    """Open ``url`` and tap through consent to the instructions."""
    page.goto(url)
    page.wait_for_selector("body[data-state='consent']", timeout=TIMEOUT_MS)
    page.tap("#consent-check")
    page.tap("#consent-button")
    page.wait_for_selector("body[data-state='instructions']", timeout=TIMEOUT_MS)


def participant_tokens(app, study_id):
    from sqlalchemy import select

    from study_app.extensions import db
    from study_app.models import Participant

    with app.app_context():
        return db.session.execute(
            select(Participant.status, Participant.n_answered, Participant.prolific_pid).where(
                Participant.study_id == study_id
            )
        ).all()


def test_participant_completes_a_study_by_keyboard(app, live_server, page, study):
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(f"{live_server}/s/{study['slug']}")
    page.wait_for_selector("body[data-state='consent']", timeout=TIMEOUT_MS)
    save_screenshot(page, "participant-consent")
    # Keyboard only: tab to the checkbox, tick it, submit the form with Enter.
    page.focus("#consent-check")
    page.keyboard.press("Space")
    assert page.is_checked("#consent-check")
    page.focus("#consent-button")
    page.keyboard.press("Enter")
    page.wait_for_selector("body[data-state='instructions']")
    save_screenshot(page, "participant-instructions")
    page.focus("#start-button")
    page.keyboard.press("Enter")

    # Practice (not stored), then the study; F, J, ← and → all answer.
    wait_trial(page)
    assert page.is_visible("#practice-badge")
    answer_practice(page, lambda: page.keyboard.press("f"))
    requested_before_answer: set[str] = set()
    keys = ["j", "ArrowLeft", "ArrowRight", "f", "j", "ArrowRight"]
    for number, key in enumerate(keys[:PLANNED]):
        wait_trial(page)
        assert not page.is_visible("#practice-badge")
        assert page.inner_text("#progress-label") == f"{number} / {PLANNED}"
        shown = page.eval_on_selector_all("#trial-stage img", "els => els.map(e => e.src)")
        assert len(shown) == 3  # reference + two candidates
        if number > 0:  # preloaded: fetched before the previous trial was answered
            assert set(shown) <= requested_before_answer, number
        if number == 0:
            save_screenshot(page, "participant-trial-desktop")
            # 16×16 stimuli are enlarged by an integer factor, pixelated, and each image
            # pixel covers exactly factor×factor device pixels.
            factor = int(page.get_attribute("#trial-stage", "data-scale"))
            assert factor >= 2
            box = page.eval_on_selector(
                "#left-slot img",
                "img => [img.getBoundingClientRect().width * devicePixelRatio,"
                " getComputedStyle(img).imageRendering, img.naturalWidth, img.complete]",
            )
            assert round(box[0]) == 16 * factor  # layout snaps to 1/64 CSS px
            assert box[1] == "pixelated" and box[2] == 16 and box[3] is True
        requested_before_answer = set(requested)
        answer(page, lambda key=key: page.keyboard.press(key))

    page.wait_for_selector("body[data-state='done']", timeout=TIMEOUT_MS)
    assert page.inner_text("#completion-code") == "C0DE-42"
    save_screenshot(page, "participant-done")

    counts = votes_per_trial(app, study["id"])
    assert len(counts) == PLANNED and set(counts.values()) == {1}
    assert [(s, n) for s, n, _ in participant_tokens(app, study["id"])] == [("completed", PLANNED)]


@pytest.mark.slow
def test_participant_on_a_phone_answers_by_touch_and_is_redirected(
    app, browser, live_server, tmp_path
):
    set_id = import_set(app, write_stimulus_set(tmp_path / "set"))
    completion_url = f"{live_server}/healthz?cc=C0DE-42"
    study = make_study(
        app,
        set_id,
        slug="phone",
        completion_url=completion_url,
        practice_trials=0,
        question_mode="no-reference",
    )
    context = browser.new_context(**PHONE)
    page = context.new_page()
    try:
        prolific = "PROLIFIC_PID=pid123&STUDY_ID=st1&SESSION_ID=se1"
        consent_by_touch(page, f"{live_server}/s/phone?{prolific}")
        # touch-first: the tap instruction, no keyboard instruction
        assert page.is_visible("text=Answer by tapping the image you choose.")
        assert not page.is_visible("kbd")
        page.tap("#start-button")
        for number in range(PLANNED):
            wait_trial(page)
            if number == 0:
                save_screenshot(page, "participant-trial-phone")
                assert not page.is_visible(".key-hint") and page.is_visible(".tap-hint")
                # No-reference mode: two candidates alone, the question says so.
                assert not page.is_visible("#reference-row")
                assert page.inner_text("#question") == "Which image looks better?"
                # Fits the phone: both candidates side by side inside the viewport.
                right = page.eval_on_selector(
                    "#choice-right", "b => b.getBoundingClientRect().right"
                )
                assert right <= 390
                factor = int(page.get_attribute("#trial-stage", "data-scale"))
                width = page.eval_on_selector(
                    "#right-slot img", "img => img.getBoundingClientRect().width * 3"
                )
                assert round(width) == 16 * factor  # 1/64 CSS px layout units
            page.tap("#choice-left" if number % 2 else "#choice-right")
            page.wait_for_function(
                "n => document.getElementById('progress-label').textContent.startsWith(n + ' ')"
                " || document.body.dataset.state === 'done'",
                arg=number + 1,
                timeout=TIMEOUT_MS,
            )
        page.wait_for_url(completion_url, timeout=TIMEOUT_MS)
    finally:
        context.close()
    counts = votes_per_trial(app, study["id"])
    assert len(counts) == PLANNED and set(counts.values()) == {1}
    assert participant_tokens(app, study["id"]) == [("completed", PLANNED, "pid123")]


def test_reload_mid_study_resumes_at_the_next_unanswered_trial(app, live_server, page, study):
    page.goto(f"{live_server}/s/{study['slug']}")
    page.wait_for_selector("body[data-state='consent']", timeout=TIMEOUT_MS)
    page.check("#consent-check")
    page.click("#consent-button")
    page.click("#start-button")
    wait_trial(page)
    answer_practice(page, lambda: page.click("#choice-left"))
    answered = []
    for _ in range(2):
        token = wait_trial(page)
        while token in answered or page.is_visible("#practice-badge"):
            page.wait_for_timeout(50)
            token = wait_trial(page)
        answered.append(token)
        page.click("#choice-right")
    page.wait_for_function(
        "() => document.getElementById('progress-label').textContent === '2 / 6'"
    )

    page.reload()
    token = wait_trial(page)  # no consent, no practice: straight back to the trials
    assert token not in answered
    assert page.inner_text("#progress-label") == f"2 / {PLANNED}"
    for _ in range(PLANNED - 2):
        wait_trial(page)
        answer(page, lambda: page.keyboard.press("j"))
    page.wait_for_selector("body[data-state='done']", timeout=TIMEOUT_MS)
    counts = votes_per_trial(app, study["id"])
    assert len(counts) == PLANNED and set(counts.values()) == {1}
    assert len(participant_tokens(app, study["id"])) == 1


@pytest.mark.slow
def test_failed_votes_are_retried_and_stored_exactly_once(app, live_server, page, study):
    calls = {"n": 0, "stored_then_lost": 0, "refused": 0}

    def flaky(route):
        calls["n"] += 1
        if calls["n"] in (2, 3):  # the connection drops before the server sees the vote
            calls["refused"] += 1
            route.abort("internetdisconnected")
        elif calls["n"] in (4, 6):  # the server stores the vote, its answer is lost
            route.fetch()
            calls["stored_then_lost"] += 1
            route.abort("connectionreset")
        else:
            route.continue_()

    page.route("**/api/v1/participant/votes", flaky)
    page.goto(f"{live_server}/s/{study['slug']}")
    page.wait_for_selector("body[data-state='consent']", timeout=TIMEOUT_MS)
    page.check("#consent-check")
    page.click("#consent-button")
    page.click("#start-button")
    wait_trial(page)
    # Every text the notice shows is logged (the page changes it faster than we poll).
    page.evaluate(
        """() => {
        const notice = document.getElementById('connection-notice');
        window.noticeLog = [];
        new MutationObserver(() => { if (!notice.hidden) window.noticeLog.push(notice.textContent); })
          .observe(notice, {childList: true, characterData: true, subtree: true, attributes: true});
    }"""
    )
    answer_practice(page, lambda: page.keyboard.press("j"))
    for number in range(PLANNED):
        wait_trial(page)

        def vote_and_watch(number=number):
            page.keyboard.press("f")
            if number == 1:  # this vote fails twice, then its answer is lost once
                try:
                    page.wait_for_selector(
                        "#connection-notice:has-text('Connection lost')", timeout=5000
                    )
                    save_screenshot(page, "participant-connection-lost")
                except PlaywrightTimeout:  # already back: the log below still proves it
                    pass

        answer(page, vote_and_watch)
    page.wait_for_selector("body[data-state='done']", timeout=TIMEOUT_MS)
    log = page.evaluate("window.noticeLog")
    assert any(text.startswith("Connection lost") for text in log), log
    assert "Connection restored." in log
    assert calls["refused"] == 2 and calls["stored_then_lost"] == 2
    assert int(page.evaluate("document.body.dataset.retries")) == 4
    counts = votes_per_trial(app, study["id"])
    assert len(counts) == PLANNED and set(counts.values()) == {1}


def test_small_windows_are_refused_and_limited_exposure_ends_in_a_mask(
    app, browser, live_server, tmp_path
):
    from sqlalchemy import select

    from study_app.extensions import db
    from study_app.models import Vote

    set_id = import_set(app, write_stimulus_set(tmp_path / "set"))
    study = make_study(
        app, set_id, slug="masked", min_viewport_w=800, exposure_ms=200, practice_trials=0
    )
    context = browser.new_context(viewport={"width": 600, "height": 700})
    page = context.new_page()
    try:
        page.goto(f"{live_server}/s/masked")
        page.wait_for_selector("body[data-state='refused']", timeout=TIMEOUT_MS)
        assert "at least 800 pixels wide" in page.inner_text("#refused-message")
        page.set_viewport_size({"width": 1024, "height": 700})
        page.wait_for_selector("body[data-state='consent']", timeout=TIMEOUT_MS)
        page.check("#consent-check")
        page.click("#consent-button")
        page.click("#start-button")
        wait_trial(page)
        page.wait_for_selector("#trial-stage[data-masked='1']", timeout=TIMEOUT_MS)
        assert page.locator("#left-slot canvas.mask").count() == 1
        assert page.locator("#left-slot img, #right-slot img, #reference-slot img").count() == 0
        answer(page, lambda: page.keyboard.press("ArrowLeft"))
    finally:
        context.close()
    with app.app_context():
        vote = db.session.scalars(select(Vote).where(Vote.study_id == study["id"])).one()
        assert vote.choice == "left" and vote.rt_ms >= 200
        assert vote.viewport_w == 1024 and vote.device_pixel_ratio == 1.0


def test_display_scale_and_retry_rules_match_their_definitions(live_server, page):
    """trial-core.js in Chromium against the rules written out independently here."""
    import random

    page.goto(f"{live_server}/")  # same origin, so the CSP allows the script below
    page.add_script_tag(url=f"{live_server}/static/js/trial-core.js")
    rng = random.Random(3)
    cases = [
        (
            rng.choice([16, 32, 64, 256, 1024]),
            rng.choice([16, 32, 64, 256]),
            rng.uniform(40, 900),
            rng.uniform(40, 900),
            rng.choice([1, 1.25, 1.5, 2, 3]),
        )
        for _ in range(300)
    ]
    results = page.evaluate(
        "cases => cases.map(([w, h, sw, sh, dpr]) => PStudyCore.displayScale(w, h, sw, sh, dpr))",
        cases,
    )
    for (w, h, sw, sh, dpr), got in zip(cases, results, strict=True):
        cap = int(16 * dpr)  # at most 16 CSS pixels per image pixel
        fitting = [f for f in range(1, cap + 1) if f * w / dpr <= sw and f * h / dpr <= sh]
        if fitting:
            factor = max(fitting)
            assert (got["factor"], got["fits"]) == (factor, True), (w, h, sw, sh, dpr, got)
            assert got["cssW"] == pytest.approx(w * factor / dpr)
            assert got["pixelated"] == (factor > 1)
        else:  # too large even at 1:1 device pixels: shrunk to fit, not pixelated
            assert got["factor"] == 1 and not got["fits"] and not got["pixelated"]
            assert got["cssW"] <= sw + 1e-6 and got["cssH"] <= sh + 1e-6
    keys = page.evaluate(
        "keys => keys.map(k => PStudyCore.keyToChoice(k))",
        ["f", "F", "ArrowLeft", "j", "J", "ArrowRight", "a", " ", "Enter"],
    )
    assert keys == ["left"] * 3 + ["right"] * 3 + [None] * 3
    delays = page.evaluate(
        "() => [0, 1, 2, 3, 4, 5, 9].map(a => PStudyCore.retryDelayMs(a, 500, 8000, () => 0.5))"
        ".concat([PStudyCore.retryDelayMs(0, 500, 8000, () => 0.5, 3)])"
    )
    assert delays == [min(8000, 500 * 2**a) for a in (0, 1, 2, 3, 4, 5, 9)] + [3000]
    statuses = page.evaluate(
        "s => s.map(PStudyCore.isRetryable)", [0, 200, 400, 401, 404, 408, 409, 429, 500, 503]
    )
    assert statuses == [True, False, False, False, False, True, False, True, True, True]


def test_a_closed_study_turns_new_people_away_before_consent(app, live_server, page, tmp_path):
    set_id = import_set(app, write_stimulus_set(tmp_path / "set"))
    study = make_study(app, set_id, slug="over", status="closed")
    page.goto(f"{live_server}/s/over")
    page.wait_for_selector("body[data-state='failed']", timeout=TIMEOUT_MS)
    assert "closed and takes no new participants" in page.inner_text("#failed-message")
    assert participant_tokens(app, study["id"]) == []


def test_a_participant_can_withdraw_mid_study(app, live_server, page, study):
    page.goto(f"{live_server}/s/{study['slug']}")
    page.wait_for_selector("body[data-state='consent']", timeout=TIMEOUT_MS)
    page.check("#consent-check")
    page.click("#consent-button")
    page.click("#start-button")
    wait_trial(page)
    answer_practice(page, lambda: page.keyboard.press("f"))
    wait_trial(page)
    answer(page, lambda: page.keyboard.press("j"))  # one real answer
    wait_trial(page)
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#withdraw")
    page.wait_for_selector("body[data-state='withdrawn']", timeout=TIMEOUT_MS)
    page.keyboard.press("f")  # answers after withdrawing are ignored
    page.wait_for_timeout(300)
    assert len(votes_per_trial(app, study["id"])) == 1
    assert [(s, n) for s, n, _ in participant_tokens(app, study["id"])] == [("returned", 1)]
    page.reload()  # the same link does not resume a withdrawn participation
    page.wait_for_selector("body[data-state='consent']", timeout=TIMEOUT_MS)


def test_an_offline_spell_goes_on_through_fetched_trials_and_sends_them_in_order(
        app, live_server, page, tmp_path):
    """Offline after the trials were fetched: the participant answers 5 trials (their
    images preloaded) while the notice counts the answers kept on the device; back
    online, the 5 votes are stored once each, in the order they were given."""
    from sqlalchemy import select

    from study_app.extensions import db
    from study_app.models import Trial, Vote

    set_id = import_set(app, write_stimulus_set(tmp_path / "offline-set"))
    study = make_study(app, set_id, slug="offline", trials_per_participant=6, batch_size=6,
                       catch_trials=0, repeat_trials=0, practice_trials=0)
    page.goto(f"{live_server}/s/{study['slug']}")
    page.wait_for_selector("body[data-state='consent']", timeout=TIMEOUT_MS)
    page.check("#consent-check")
    page.click("#consent-button")
    page.click("#start-button")
    wait_trial(page)
    page.wait_for_function(  # every fetched trial's images are decoded
        "() => performance.getEntriesByType('resource')"
        ".filter(e => e.name.includes('/media/')).length >= 6 * 2")
    page.context.set_offline(True)
    given: list[str] = []
    for number in range(5):
        given.append(wait_trial(page))
        answer(page, lambda key="f" if number % 2 else "j": page.keyboard.press(key))
        assert page.evaluate("document.body.dataset.outbox") == str(number + 1)
    notice = page.inner_text("#connection-notice")
    assert notice.startswith("Connection lost: 5 answers kept on this device"), notice
    save_screenshot(page, "participant-offline-queue")
    with app.app_context():
        assert db.session.scalar(select(Vote.id).where(Vote.study_id == study["id"])) is None
    page.context.set_offline(False)
    page.wait_for_function("() => document.body.dataset.outbox === '0'", timeout=TIMEOUT_MS)
    with app.app_context():
        stored = db.session.execute(
            select(Trial.token, Vote.trial_index, Vote.choice).join(Vote)
            .where(Vote.study_id == study["id"]).order_by(Vote.trial_index)).all()
    assert [token for token, _, _ in stored] == given  # each once, in answer order
    assert [index for _, index, _ in stored] == [0, 1, 2, 3, 4]
    assert [choice for _, _, choice in stored] == ["right", "left", "right", "left", "right"]
    wait_trial(page)
    answer(page, lambda: page.keyboard.press("j"))
    page.wait_for_selector("body[data-state='done']", timeout=TIMEOUT_MS)
    counts = votes_per_trial(app, study["id"])
    assert len(counts) == 6 and set(counts.values()) == {1}


def test_practice_ends_on_a_start_screen_back_stays_and_breaks_come_every_n(
        app, live_server, page, tmp_path):
    """After practice a screen says the real trials start now; the browser's Back button
    asks before leaving and, declined, keeps the participant on the trial; a pause screen
    comes after every `break_every` answers; the generated instructions say so."""
    set_id = import_set(app, write_stimulus_set(tmp_path / "flow-set"))
    study = make_study(app, set_id, slug="flow", break_every=2, exposure_ms=None)
    page.goto(f"{live_server}/s/{study['slug']}")
    page.wait_for_selector("body[data-state='consent']", timeout=TIMEOUT_MS)
    page.check("#consent-check")
    page.click("#consent-button")
    page.wait_for_selector("body[data-state='instructions']", timeout=TIMEOUT_MS)
    instructions = page.inner_text("#instructions-text")
    assert "There is no time limit" in instructions
    assert "after every 2 trials" in instructions and "The first trial is practice" in instructions
    assert page.is_visible("kbd") and not page.is_visible(".touch-only")  # a mouse here
    page.click("#start-button")
    wait_trial(page)
    assert page.is_visible("#practice-badge")
    page.keyboard.press("f")
    page.wait_for_selector("body[data-state='main-start']", timeout=TIMEOUT_MS)
    save_screenshot(page, "participant-main-start")
    page.click("#start-main-button")
    token = wait_trial(page)
    asked: list[str] = []

    def decline(dialog):
        asked.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", decline)
    page.go_back()
    page.wait_for_function("() => document.body.dataset.state === 'trial'")
    assert asked and asked[0].startswith("Leave the study?")
    assert page.url.endswith("/s/flow") and wait_trial(page) == token
    page.remove_listener("dialog", decline)
    breaks = 0
    for number in range(PLANNED):
        wait_trial(page)
        page.keyboard.press("j")
        page.wait_for_function(
            "() => ['break', 'done'].includes(document.body.dataset.state) || "
            "document.getElementById('trial-stage').dataset.ready === '1'",
            timeout=TIMEOUT_MS)
        if page.evaluate("document.body.dataset.state") == "break":
            breaks += 1
            assert number + 1 in (2, 4) and f"answered {number + 1} of {PLANNED}" in \
                page.inner_text("#break-message")
            page.click("#continue-button")
    page.wait_for_selector("body[data-state='done']", timeout=TIMEOUT_MS)
    assert breaks == 2  # after 2 and 4 of 6, not after the last
    counts = votes_per_trial(app, study["id"])
    assert len(counts) == PLANNED and set(counts.values()) == {1}


def test_a_german_study_end_to_end(app, live_server, page, tmp_path):
    """A study in German: every screen a participant passes shows German text only."""
    from tests.test_i18n import english_phrases

    set_id = import_set(app, write_stimulus_set(tmp_path / "de-set"))
    study = make_study(app, set_id, slug="deutsch", language="de")
    english = english_phrases()

    def no_english(screen: str) -> None:
        text = page.inner_text("body")
        leaks = sorted(phrase for phrase in english if phrase in text)
        assert leaks == [], (screen, leaks)

    page.goto(f"{live_server}/s/{study['slug']}")
    page.wait_for_selector("body[data-state='consent']", timeout=TIMEOUT_MS)
    assert page.get_attribute("html", "lang") == "de"
    assert "wissenschaftliche Studie" in page.inner_text("#consent-text")
    no_english("consent")
    page.check("#consent-check")
    page.click("#consent-button")
    page.wait_for_selector("body[data-state='instructions']")
    assert page.inner_text("#start-button") == "Übung starten"
    no_english("instructions")
    save_screenshot(page, "participant-instructions-de")
    page.click("#start-button")
    wait_trial(page)
    assert page.inner_text("#question") == "Welches Bild ist der Referenz ähnlicher?"
    assert page.inner_text("#progress-label") == "Übung 1 / 1"
    no_english("practice")
    answer_practice(page, lambda: page.keyboard.press("f"))
    for _ in range(PLANNED):
        wait_trial(page)
        no_english("trial")
        answer(page, lambda: page.keyboard.press("j"))
    page.wait_for_selector("body[data-state='done']", timeout=TIMEOUT_MS)
    assert "Vielen Dank!" in page.inner_text("#screen-done")
    no_english("done")
    counts = votes_per_trial(app, study["id"])
    assert len(counts) == PLANNED and set(counts.values()) == {1}
