"""Participant-facing text in the study's language (Flask-Babel, gettext catalogues).

Every string a participant can see goes through gettext: the participant page's template
(``{{ _("...") }}``), the texts its script shows (:func:`participant_texts`, handed to
the page as JSON), and the study's default question, instructions and consent
(:mod:`study_app.studies`). A study's ``language`` picks the catalogue
(``study_app/translations/<lang>/LC_MESSAGES/messages.po``); researcher pages stay
English. The catalogue workflow (extract, update, translate, compile) is in
docs/participant_pages.md; a test fails when a participant string has no translation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from flask import Flask, g
from flask_babel import Babel, force_locale, gettext

LANGUAGES = {"en": "English", "de": "Deutsch"}
DEFAULT_LANGUAGE = "en"

babel = Babel()


def _locale() -> str:
    return g.get("study_language", DEFAULT_LANGUAGE)


def init_app(app: Flask) -> None:
    """Register Flask-Babel with the study's language as the locale."""
    babel.init_app(app, locale_selector=_locale,
                   default_translation_directories="translations")


@contextmanager
def study_language(language: str) -> Iterator[None]:
    """Render participant text in ``language`` inside this block."""
    with force_locale(language):
        yield


def participant_texts() -> dict[str, str]:
    """The texts participant.js shows, in the active language. ``%(name)s`` marks a value
    the script fills in (``t(key, {name: value})``)."""
    return {
        "connection_restored": gettext("Connection restored."),
        "connection_lost": gettext("Connection lost. Retrying… your answers are kept and "
                                   "will be sent when the connection is back."),
        "answer_kept": gettext("Connection lost: 1 answer kept on this device, sent when "
                               "the connection is back. You can go on."),
        "answers_kept": gettext("Connection lost: %(count)s answers kept on this device, "
                                "sent when the connection is back. You can go on."),
        "answer_refused": gettext("An answer could not be stored (%(reason)s); continuing."),
        "back_online": gettext("Back online, sending…"),
        "practice_progress": gettext("Practice %(number)s / %(total)s"),
        "correct": gettext("Correct."),
        "not_quite": gettext("Not quite: the other image was identical to the reference."),
        "not_quite_same": gettext("Not quite: the two images were the same."),
        "not_quite_different": gettext("Not quite: the two images were different."),
        "answer_first": gettext("First"),
        "answer_second": gettext("Second"),
        "answer_same": gettext("Same"),
        "answer_different": gettext("Different"),
        "paused_waiting": gettext("The study is paused for a moment. Please keep this page "
                                  "open; it continues automatically."),
        "waiting": gettext("Waiting for the next trials. Please keep this page open."),
        "break_message": gettext("You have answered %(answered)s of %(total)s. Rest your eyes "
                                 "for a moment, then continue when you are ready."),
        "leave_study": gettext("Leave the study? Your answers so far are kept, and the same "
                               "link brings you back."),
        "screen_too_small": gettext("This study needs a window at least %(minimum)s pixels "
                                    "wide (yours is %(width)s). Please use a larger screen "
                                    "or widen the window."),
        "no_such_study": gettext("This study does not exist."),
        "study_not_loaded": gettext("The study could not be loaded (%(reason)s). Reload the "
                                    "page to try again."),
        "tap_hint": gettext("Tap the image you choose"),
        "closed_to_new": gettext("This study is closed and takes no new participants. Thank "
                                 "you for your interest."),
        "paused_to_new": gettext("This study is paused and takes no new participants right "
                                 "now. Please try again later."),
        "withdrawn_already": gettext("You have withdrawn from this study. Thank you for your "
                                     "time."),
        "not_accepting": gettext("This study is not accepting participants right now."),
        "could_not_start": gettext("Could not start (%(reason)s). Reload the page to try "
                                   "again."),
        "start_practice": gettext("Start practice"),
        "start": gettext("Start"),
        "session_invalid": gettext("This session is no longer valid. Reload the page to start "
                                   "again."),
        "study_closed_midway": gettext("The researchers have closed this study. The answers "
                                       "you gave are kept. Thank you for taking part."),
        "went_wrong": gettext("Something went wrong (%(reason)s). Reload the page to continue "
                              "where you left off."),
        "confirm_withdraw": gettext("Stop the study now? Your answers so far are kept and "
                                    "marked as withdrawn."),
        "could_not_withdraw": gettext("Could not withdraw (%(reason)s). Reload the page and "
                                      "try again."),
        # the display step (calibration.js)
        "distance_progress": gettext("Measurement %(number)s of %(total)s"),
        "dot_missed": gettext("The dot reached the edge: keep looking at the square and "
                              "press as soon as the dot disappears. Once more…"),
        "display_scaled": gettext("Your page is scaled (device pixel ratio %(ratio)s), so the "
                                  "images would be resampled. Reset the browser zoom (Ctrl+0, "
                                  "or Cmd+0 on a Mac) and set the system's display scaling to "
                                  "100 or 200 percent, then check again."),
        "zoom_not_100": gettext("Your browser zoom seems to be %(zoom)s percent. Reset it to "
                                "100 percent (Ctrl+0, or Cmd+0 on a Mac), then check again."),
        "too_few_px_per_deg": gettext("At your viewing distance the screen gives %(value)s "
                                      "pixels per degree; this study needs at least "
                                      "%(minimum)s. Sit farther from the screen, then measure "
                                      "again."),
        "implausible_distance": gettext("That measurement does not look right. Keep looking at "
                                        "the square and press the moment the dot disappears; "
                                        "let us measure again."),
        "fullscreen_unavailable": gettext("This study needs fullscreen, which this browser does "
                                          "not offer. Please open the link in another browser, "
                                          "for example on a computer."),
        "fullscreen_refused": gettext("The browser did not switch to fullscreen (%(reason)s). "
                                      "Please try again."),
    }
