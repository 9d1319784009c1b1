"""Participant pages: ``/s/<slug>`` runs a study in the browser.

The page is a shell (templates/participant/study.html) driven by
``static/js/participant.js`` over the participant JSON API (``/api/v1``); Prolific's
``PROLIFIC_PID``, ``STUDY_ID`` and ``SESSION_ID`` stay in the URL and are read by the page.
A study that does not exist, or is still a draft, answers 404.
"""

from __future__ import annotations

from flask import Blueprint, abort, render_template
from markupsafe import Markup
from sqlalchemy import select

from study_app.extensions import db
from study_app.i18n import participant_texts, study_language
from study_app.models import Study
from study_app.studies import study_config

bp = Blueprint("participant", __name__)

API_BASE = "/api/v1"


KEYS_LEFT = Markup("<kbd>F</kbd> / <kbd>←</kbd>")
KEYS_RIGHT = Markup("<kbd>J</kbd> / <kbd>→</kbd>")


def render_study_page(study: Study, preview: bool = False) -> str:
    """The participant page for ``study`` (``preview``: a logged-in researcher's trial
    run), in the study's language."""
    config = study_config(study)
    language = config.language
    with study_language(language):
        texts = participant_texts()
        labels = ((texts["answer_same"], texts["answer_different"]) if config.task == "jnd"
                  else (texts["answer_first"], texts["answer_second"]))
        return render_template(
            "participant/study.html", study=study, api_base=API_BASE, preview=preview,
            texts=texts, html_lang=language, keys_left=KEYS_LEFT,
            keys_right=KEYS_RIGHT, sequential=config.sequential, answer_labels=labels,
        )


@bp.get("/s/<slug>")
def study_page(slug: str):
    """The page a participant link points to (live, paused or closed studies)."""
    study = db.session.scalars(select(Study).where(Study.slug == slug)).first()
    if study is None or study.status == "draft":
        abort(404, description=f"There is no study at this address ({slug!r}). Check the link.")
    return render_study_page(study)
