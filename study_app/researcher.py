"""Researcher pages: studies, creation form, preview, status, live dashboard, downloads.

Every route here is behind :func:`study_app.auth.login_required` (a test walks the URL
map to prove it) and every study route checks the researcher's role on the study
(:mod:`study_app.access`: viewer, editor, owner, admin; a stranger gets the same 404 as
for a study that does not exist; another test walks the map with each role). Numbers on
the dashboard come from the database (participants, items) and from the ``analysis``
package (preference rates and intervals, the matrix plot); the downloads use
:mod:`study_app.export` (contract 2) and the stored study configuration and stimulus
manifest.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from datetime import UTC, datetime
from typing import Any

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    flash,
    jsonify,
    redirect,
    render_template,
    request,
    send_file,
    stream_with_context,
    url_for,
)
from flask_wtf import FlaskForm
from sqlalchemy import func, select
from wtforms import (
    BooleanField,
    EmailField,
    HiddenField,
    IntegerField,
    SelectField,
    SelectMultipleField,
    StringField,
    TextAreaField,
)
from wtforms.fields.choices import SelectChoice
from wtforms.validators import DataRequired, InputRequired, Length, NumberRange, Optional
from wtforms.widgets import CheckboxInput, ListWidget

from study_app import access
from study_app.access import EDIT, MANAGE, VIEW
from study_app.auth import current_researcher, login_required
from study_app.extensions import db
from study_app.i18n import LANGUAGES
from study_app.models import COLLABORATOR_ROLES, Item, Participant, StimulusSet, Study
from study_app.participant import render_study_page
from study_app.studies import (
    MAX_EXPOSURE_MS,
    MAX_SEQUENCE_MS,
    QUESTIONS,
    StudyConfigError,
    create_study,
    design_summary,
    parse_config,
    set_status,
    study_config,
)

bp = Blueprint("researcher", __name__, url_prefix="/researcher")

DASHBOARD_REFRESH_MS = 3000  # how often an open dashboard polls dashboard.json
STATUS_ACTIONS = {"start": "live", "pause": "paused", "resume": "live", "close": "closed"}


@bp.before_request
@login_required
def _require_login():
    """Every route of this blueprint needs a logged-in researcher."""
    return None


# --------------------------------------------------------------------------- forms


class ImportForm(FlaskForm):
    path = StringField("Folder on the server", validators=[DataRequired(), Length(max=4096)])


class StatusForm(FlaskForm):
    """Only the CSRF token: the action is in the URL."""


class ShareForm(FlaskForm):
    email = EmailField("E-mail of a researcher", validators=[DataRequired(), Length(max=254)])
    role = SelectField("Role", choices=list(COLLABORATOR_ROLES), default="viewer")


class UnshareForm(FlaskForm):
    email = HiddenField(validators=[DataRequired(), Length(max=254)])


class StudyForm(FlaskForm):
    title = StringField("Title", validators=[DataRequired(), Length(max=200)])
    slug = StringField("Link name (slug)", validators=[DataRequired(), Length(min=2, max=80)])
    conditions = SelectMultipleField(
        "Conditions", widget=ListWidget(prefix_label=False), option_widget=CheckboxInput()
    )
    question_mode = SelectField("Question", choices=list(QUESTIONS))
    question = StringField(
        "Custom question text (optional)", validators=[Optional(), Length(max=300)]
    )
    votes_per_item = IntegerField(
        "Votes per item (K)", default=5, validators=[InputRequired(), NumberRange(1, 10_000)]
    )
    trials_per_participant = IntegerField(
        "Main trials per participant (M)",
        default=20,
        validators=[InputRequired(), NumberRange(1, 10_000)],
    )
    catch_trials = IntegerField(
        "Catch trials", default=2, validators=[InputRequired(), NumberRange(0, 1000)]
    )
    repeat_trials = IntegerField(
        "Repeat trials", default=2, validators=[InputRequired(), NumberRange(0, 1000)]
    )
    practice_trials = IntegerField(
        "Practice trials", default=2, validators=[InputRequired(), NumberRange(0, 50)]
    )
    display_scale = StringField(
        "Enlargement: 'auto' or an integer factor",
        default="auto",
        validators=[DataRequired(), Length(max=8)],
    )
    pixelated = BooleanField("Pixelated enlargement (no smoothing)", default=True)
    exposure_ms = IntegerField(
        "Limited exposure (ms, then a mask; empty = unlimited)",
        validators=[Optional(), NumberRange(1, MAX_EXPOSURE_MS)],
    )
    task = SelectField("Task", default="2afc", choices=[
        SelectChoice("2afc", "2afc: which of two images"),
        SelectChoice("jnd", "jnd: same or different? (each condition vs its reference)")])
    presentation = SelectField("Presentation", default="side-by-side", choices=[
        SelectChoice("side-by-side", "side by side"),
        SelectChoice("sequential", "sequential: one after the other at one place")])
    first_ms = IntegerField("Sequential: first image (ms)", default=500,
                            validators=[Optional(), NumberRange(1, MAX_SEQUENCE_MS)])
    isi_ms = IntegerField("Sequential: interval between them (ms)", default=500,
                          validators=[Optional(), NumberRange(0, MAX_SEQUENCE_MS)])
    second_ms = IntegerField("Sequential: second image (ms)", default=500,
                             validators=[Optional(), NumberRange(1, MAX_SEQUENCE_MS)])
    isi_mask = SelectField("Sequential: the interval shows", default="grey", choices=[
        SelectChoice("grey", "a grey field"), SelectChoice("noise", "random noise"),
        SelectChoice("none", "nothing (the page background)")])
    min_viewport_w = IntegerField(
        "Refuse windows narrower than (CSS px; empty = any)",
        validators=[Optional(), NumberRange(1, 100_000)],
    )
    completion_code = StringField("Completion code", validators=[Optional(), Length(max=64)])
    completion_url = StringField(
        "Completion redirect URL (e.g. Prolific)", validators=[Optional(), Length(max=1000)]
    )
    language = SelectField("Participant pages' language",
                           choices=[SelectChoice(code, name) for code, name in LANGUAGES.items()],
                           default="en")
    break_every = IntegerField(
        "A break after every N trials (empty = no breaks)",
        validators=[Optional(), NumberRange(1, 10_000)],
    )
    instructions = TextAreaField(
        "Instructions (empty = default)", validators=[Optional(), Length(max=10_000)]
    )
    consent = TextAreaField(
        "Consent text (empty = default)", validators=[Optional(), Length(max=20_000)]
    )
    min_catch_accuracy = StringField(
        "Exclude below catch accuracy (0..1; empty = off)", default="0.75", validators=[Optional()]
    )
    min_rt_ms = StringField(
        "Too-fast responses: under (ms; empty = off)", default="200", validators=[Optional()]
    )
    max_side_bias = StringField(
        "Exclude above one-side fraction (0..1; empty = off)",
        default="0.9",
        validators=[Optional()],
    )
    seed = IntegerField("Random seed", default=0, validators=[InputRequired()])
    design = SelectField("Pair selection", default="balanced", choices=[
        SelectChoice("balanced", "balanced: K votes on every image × pair"),
        SelectChoice("active", "active: the most informative pair next (K = cap per item)")])
    calibration_mode = SelectField("Display calibration (credit card)", default="off", choices=[
        SelectChoice("off", "off"),
        SelectChoice("optional", "optional: offered, may be skipped"),
        SelectChoice("required", "required")])
    viewing_distance = SelectField(
        "Viewing distance (blind spot, after the card)", default="optional",
        choices=[SelectChoice(v, v) for v in ("off", "optional", "required")])
    min_px_per_deg = StringField(
        "Minimum pixels per degree (empty = any)", validators=[Optional()])
    require_unscaled = BooleanField("Refuse browser zoom ≠ 100 % and fractional pixel ratios")
    require_fullscreen = BooleanField("Trials only in fullscreen (leaving it pauses)")
    stop_half_width = StringField(
        "Active: stop at 95 % half-width (JOD; empty = no target)", validators=[Optional()])
    vote_budget = IntegerField(
        "Active: vote budget (empty = none)", validators=[Optional(), NumberRange(1, 10_000_000)])


def _float_or_none(text: str | None, name: str) -> float | None:
    if text is None or str(text).strip() == "":
        return None
    try:
        return float(text)
    except ValueError as error:
        raise StudyConfigError(f"'{name}' must be a number or empty, got {text!r}") from error


def config_from_form(form: StudyForm) -> dict[str, Any]:
    """The study configuration mapping a submitted form describes (validated later)."""
    scale_text = form.display_scale.data.strip().lower()
    if scale_text == "auto":
        scale: int | str = "auto"
    elif scale_text.isdigit():
        scale = int(scale_text)
    else:
        raise StudyConfigError(
            f"'display_scale' must be 'auto' or an integer, got {form.display_scale.data!r}"
        )
    data: dict[str, Any] = {
        "title": form.title.data.strip(),
        "slug": form.slug.data.strip(),
        "conditions": list(form.conditions.data) or None,
        "question_mode": form.question_mode.data,
        "question": (form.question.data or "").strip() or None,
        "votes_per_item": form.votes_per_item.data,
        "trials_per_participant": form.trials_per_participant.data,
        "catch_trials": form.catch_trials.data,
        "repeat_trials": form.repeat_trials.data,
        "practice_trials": form.practice_trials.data,
        "display_scale": scale,
        "pixelated": bool(form.pixelated.data),
        "exposure_ms": form.exposure_ms.data,
        "task": form.task.data,
        "presentation": form.presentation.data,
        # empty: the defaults (500 ms each)
        **{name: getattr(form, name).data for name in ("first_ms", "isi_ms", "second_ms")
           if getattr(form, name).data is not None},
        "isi_mask": form.isi_mask.data,
        "min_viewport_w": form.min_viewport_w.data,
        "completion_code": (form.completion_code.data or "").strip() or None,
        "completion_url": (form.completion_url.data or "").strip() or None,
        "seed": form.seed.data,
        "design": form.design.data,
        "stop_half_width": _float_or_none(form.stop_half_width.data, "stop_half_width"),
        "vote_budget": form.vote_budget.data,
        "language": form.language.data,
        "break_every": form.break_every.data,
        "calibration": {
            "mode": form.calibration_mode.data,
            "viewing_distance": form.viewing_distance.data,
            "min_px_per_deg": _float_or_none(form.min_px_per_deg.data, "min_px_per_deg"),
            "require_unscaled": bool(form.require_unscaled.data),
            "require_fullscreen": bool(form.require_fullscreen.data),
        },
        "exclusion": {
            "min_catch_accuracy": _float_or_none(
                form.min_catch_accuracy.data, "min_catch_accuracy"
            ),
            "min_rt_ms": _float_or_none(form.min_rt_ms.data, "min_rt_ms"),
            "max_side_bias": _float_or_none(form.max_side_bias.data, "max_side_bias"),
        },
    }
    for text_field in ("instructions", "consent"):
        value = (getattr(form, text_field).data or "").strip()
        if value:
            data[text_field] = value
    if data["task"] == "jnd":  # no separate reference: each condition against it
        data.pop("question_mode")
        data["presentation"] = "sequential"
    elif data["conditions"] is not None and len(data["conditions"]) < 2:
        raise StudyConfigError("choose at least two conditions (or none for all of them)")
    return data


# --------------------------------------------------------------------------- helpers


def _study_or_404(slug: str, needed: str = VIEW) -> Study:
    """The study ``slug`` if the logged-in researcher has at least role ``needed`` on it.

    A stranger gets exactly the 404 of a study that does not exist; a collaborator whose
    role is too weak gets 403 (they know the study exists).
    """
    study = db.session.scalars(select(Study).where(Study.slug == slug)).first()
    role = None if study is None else access.study_role(current_researcher(), study)
    if role is None:
        abort(404, description=f"There is no study called {slug!r}.")
    if not access.allows(role, needed):
        abort(403, description=f"As {_article(role)} {role} of this study you may not do "
              f"this: it takes the {needed} role or more (ask the study's owner).")
    return study


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


MAX_ID = 2**31 - 1  # the largest id an INTEGER column holds (PostgreSQL)


def _set_from_query() -> StimulusSet | None:
    """The stimulus set of ``?set=<id>`` if the researcher may use it; None when no set is
    asked for; 400 for junk, 404 for a set that does not exist or is not theirs."""
    text = request.args.get("set", "")
    if text == "":
        return None
    if not (text.isascii() and text.isdigit() and len(text) <= 10):
        abort(400, description=f"'set' must be the number of a stimulus set, not {text[:40]!r}.")
    set_id = int(text)
    stimulus_set = access.may_use_set(current_researcher(), set_id) if set_id <= MAX_ID else None
    if stimulus_set is None:
        abort(404, description=f"There is no stimulus set {set_id} that you may use.")
    return stimulus_set


def _database_url() -> str:
    return current_app.config["SQLALCHEMY_DATABASE_URI"]


def study_responses(study: Study):
    """The study's responses (contract 2 DataFrame) through the export module, read on
    the session's connection (so inside the dashboard's snapshot)."""
    import pandas as pd

    from study_app.export import COLUMNS, iter_responses

    frames = [pd.DataFrame(batch, columns=list(COLUMNS))
              for batch in iter_responses(db.session.connection(), study.id)]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS}).astype(
            {"participant_excluded": bool})
    return pd.concat(frames, ignore_index=True)


def begin_snapshot() -> None:
    """End the request's transaction and begin a read transaction whose queries all see
    one snapshot of the database (PostgreSQL: REPEATABLE READ; SQLite: one WAL read
    transaction), so every dashboard panel describes the same moment."""
    session = db.session()
    if session.in_transaction():
        session.commit()
    options = ({"isolation_level": "REPEATABLE READ"}
               if db.engine.dialect.name == "postgresql" else {})
    session.connection(execution_options=options)


def participant_counts(study: Study) -> dict[str, int]:
    """Participants of ``study`` by status (previews left out), zeros included."""
    rows = db.session.execute(
        select(Participant.status, func.count())
        .where(Participant.study_id == study.id, Participant.preview.is_(False))
        .group_by(Participant.status)
    ).all()
    counts = {"started": 0, "completed": 0, "returned": 0}
    counts.update({status: int(n) for status, n in rows})
    return counts


def display_coverage(study: Study) -> dict[str, Any]:
    """Display calibration coverage over the study's participants (previews left out):
    how many reported a display check, ``calibrated`` (a card: px/mm), ``passed``, the
    share calibrated (None without participants), the px/deg summary
    (:func:`analysis.display.value_summary`) and the sentence the dashboard shows."""
    from analysis.display import value_summary

    rows = db.session.execute(
        select(Participant.display_status, Participant.px_per_mm, Participant.px_per_deg)
        .where(Participant.study_id == study.id, Participant.preview.is_(False))
    ).all()
    n = len(rows)
    calibrated = sum(1 for row in rows if row.px_per_mm is not None)
    deg = value_summary(row.px_per_deg for row in rows)
    coverage = {
        "participants": n, "checked": sum(1 for row in rows if row.display_status),
        "passed": sum(1 for row in rows if row.display_status == "passed"),
        "calibrated": calibrated, "share": calibrated / n if n else None, "px_per_deg": deg,
    }
    coverage["text"] = _coverage_text(coverage)
    return coverage


def _coverage_text(c: dict[str, Any]) -> str:
    if not c["participants"]:
        return "Display calibration: no participants yet."
    text = (f"Display calibration: {c['calibrated']} of {c['participants']} participants "
            f"calibrated ({100 * c['share']:.1f} %); {c['passed']} passed the display check.")
    deg = c["px_per_deg"]
    if deg["n"]:
        text += (f" Pixels per degree ({deg['n']} with a viewing distance): median "
                 f"{deg['median']:.1f}, quartiles {deg['q25']:.1f}–{deg['q75']:.1f}, range "
                 f"{deg['min']:.1f}–{deg['max']:.1f}.")
    return text


def item_progress(study: Study, k: int) -> dict[str, Any]:
    """Votes per item against K: a histogram, totals and a per-pair summary."""
    rows = db.session.execute(
        select(Item.condition_a_id, Item.condition_b_id, Item.n_votes).where(
            Item.study_id == study.id
        )
    ).all()
    names = {c.id: c.name for c in study.stimulus_set.conditions}
    histogram = [0] * (k + 1)
    pairs: dict[tuple[str, str], dict[str, int]] = {}
    for a_id, b_id, n_votes in rows:
        histogram[min(n_votes, k)] += 1
        pair = pairs.setdefault((names[a_id], names[b_id]), {"items": 0, "votes": 0, "complete": 0})
        pair["items"] += 1
        pair["votes"] += n_votes
        pair["complete"] += int(n_votes >= k)
    total_votes = sum(n for _, _, n in rows)
    return {
        "k": k,
        "items": len(rows),
        "items_complete": sum(1 for *_, n in rows if n >= k),
        "votes": total_votes,
        "votes_wanted": k * len(rows),
        "histogram": [{"votes": v, "items": n} for v, n in enumerate(histogram)],
        "pairs": [
            {"condition_a": a, "condition_b": b, **values, "wanted": values["items"] * k}
            for (a, b), values in sorted(pairs.items())
        ],
    }


def _included(responses):
    if "participant_excluded" in responses.columns and len(responses):
        return responses[~responses["participant_excluded"].astype(bool)]
    return responses


def exclusion_summary(responses) -> dict[str, Any]:
    """Excluded participants and how often each rule fired (from the export's flags)."""
    if responses.empty:
        return {"excluded": 0, "participants": 0, "reasons": {}}
    per_participant = responses.groupby("participant").agg(
        excluded=("participant_excluded", "first"), reasons=("exclusion_reasons", "first")
    )
    reasons: dict[str, int] = {}
    for text in per_participant.loc[per_participant["excluded"].astype(bool), "reasons"]:
        for rule in str(text or "").split(";"):
            if rule:
                reasons[rule] = reasons.get(rule, 0) + 1
    return {
        "excluded": int(per_participant["excluded"].astype(bool).sum()),
        "participants": int(len(per_participant)),
        "reasons": dict(sorted(reasons.items())),
    }


def timing_quality(responses) -> dict[str, Any]:
    """Frame-timed exposures (the export's ``exposure_ok``): ``timed`` trials with frame
    timing, ``within_one_frame`` of them, and their ``share`` (0..1; None without any)."""
    flags = responses["exposure_ok"].dropna() if "exposure_ok" in responses.columns else []
    timed, within = len(flags), sum(bool(flag) for flag in flags)
    return {"timed": timed, "within_one_frame": within,
            "share": within / timed if timed else None}


def preference_rows(responses) -> list[dict[str, Any]]:
    """The report's per-pair table (``analysis.report.pair_table``: share of votes with
    the two-way interval and test, participants and images random) over the included
    participants' main trials; NaN (not estimable yet) becomes None."""
    from analysis.qc import two_afc
    from analysis.report import pair_table

    included = _included(responses)
    table = pair_table(included[two_afc(included)])  # a JND answer has no winner
    columns = ["condition_a", "condition_b", "n", "wins_a", "rate_a", "ci_low", "ci_high",
               "p_value", "p_holm"]

    def plain(value):
        value = value.item() if hasattr(value, "item") else value
        return None if isinstance(value, float) and value != value else value

    return [
        {c: plain(row[c]) if c in row else None for c in columns}
        for _, row in table.iterrows()
    ]


PARTICIPANT_COLUMNS = ("participant", "prolific_pid", "status", "started_at", "finished_at",
                       "answered", "catch_accuracy", "excluded", "exclusion_reasons",
                       "suggested_action")


def participant_rows(study: Study, responses) -> list[dict[str, Any]]:
    """One row per participant (previews left out): status, Prolific ID, start and
    finish, answers, catch accuracy, exclusion reasons and the suggested Prolific action
    (approve a completed, included participant; reject one who failed the attention
    checks, i.e. the catch trials; review any other exclusion; nothing to do for the
    returned or unfinished, who have no submission)."""
    people = db.session.execute(
        select(Participant.public_id, Participant.prolific_pid, Participant.status,
               Participant.created_at, Participant.finished_at, Participant.n_answered)
        .where(Participant.study_id == study.id, Participant.preview.is_(False))
        .order_by(Participant.id)
    ).all()
    flags: dict[str, tuple[bool, str]] = {}
    catch: dict[str, float] = {}
    if len(responses):
        first = responses.groupby("participant")[["participant_excluded", "exclusion_reasons"]]
        flags = {p: (bool(e), r or "") for p, (e, r) in first.first().iterrows()}
        trials = responses[responses["trial_kind"] == "catch"]
        correct = trials["chosen_condition"] == trials["expected_condition"]
        catch = correct.groupby(trials["participant"]).mean().to_dict()
    rows = []
    for public_id, prolific_pid, status, started, finished, answered in people:
        excluded, reasons = flags.get(public_id, (False, ""))
        if status != "completed":
            action = "none"  # returned or unfinished: no submission to approve
        elif not excluded:
            action = "approve"
        elif "catch_accuracy" in reasons.split(";"):
            action = "reject"
        else:
            action = "review"
        rows.append({
            "participant": public_id, "prolific_pid": prolific_pid or "", "status": status,
            "started_at": _iso(started), "finished_at": _iso(finished) if finished else "",
            "answered": int(answered), "catch_accuracy": catch.get(public_id),
            "excluded": excluded, "exclusion_reasons": reasons, "suggested_action": action,
        })
    return rows


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def estimate_remaining(config, items: dict[str, Any], people: list[dict[str, Any]]
                       ) -> dict[str, Any]:
    """How many more participants (and how long) the study still needs for its K votes
    per item: each participant gives at most M main votes, of which only those of kept
    participants count; times are the median of completed participations."""
    remaining = max(0, items["votes_wanted"] - items["votes"])
    completed = [p for p in people if p["status"] == "completed"]
    kept = [p for p in completed if not p["excluded"]]
    kept_rate = len(kept) / len(completed) if completed else 1.0
    main_each = min(config.trials_per_participant, items["items"])  # each item once at most
    per_participant = main_each * max(kept_rate, 0.05)
    needed = 0 if remaining == 0 else int(-(-remaining // per_participant))
    durations = sorted(
        (datetime.fromisoformat(p["finished_at"].replace("Z", "+00:00"))
         - datetime.fromisoformat(p["started_at"].replace("Z", "+00:00"))).total_seconds()
        for p in completed if p["finished_at"])
    median_s = durations[len(durations) // 2] if durations else None
    return {
        "votes_remaining": remaining, "participants_needed": needed,
        "kept_rate": kept_rate, "median_minutes": None if median_s is None else median_s / 60,
        "participant_minutes_needed": None if median_s is None else needed * median_s / 60,
    }


def _active_summary(study: Study, config) -> dict[str, Any] | None:
    if config.design != "active":
        return None
    from study_app.active import precision_summary  # numpy/scipy only for active studies

    return precision_summary(study, config)


def dashboard_data(study: Study) -> dict[str, Any]:
    """Everything the live dashboard shows, as JSON-ready values, every panel read from
    one snapshot (:func:`begin_snapshot`); ``version`` changes whenever any of it does
    (the preference plot is fetched by it)."""
    begin_snapshot()
    study = db.session.get(Study, study.id)
    config = study_config(study)
    responses = study_responses(study)
    items = item_progress(study, config.votes_per_item)
    people = participant_rows(study, responses)
    data = {
        "study": study.slug,
        "status": study.status,
        "participants": participant_counts(study),
        "exclusions": exclusion_summary(responses),
        "timing": timing_quality(responses),
        "display": display_coverage(study) if config.calibration.step_shown else None,
        "responses": int(len(responses)),
        "items": items,
        "preference": preference_rows(responses),
        "people": people,
        "estimate": estimate_remaining(config, items, people),
        "active": _active_summary(study, config),
    }
    data["version"] = hashlib.sha256(
        json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
    data["updated_at"] = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return data


# --------------------------------------------------------------------------- pages


@bp.get("/")
def index():
    """The studies and stimulus sets this researcher may see."""
    researcher = current_researcher()
    studies = db.session.scalars(
        access.visible_studies(researcher).order_by(Study.created_at.desc())
    ).all()
    sets = db.session.scalars(
        access.usable_sets(researcher).order_by(StimulusSet.imported_at.desc())
    ).all()
    counts = {s.id: participant_counts(s) for s in studies}
    return render_template(
        "researcher/index.html", studies=studies, sets=sets, counts=counts, import_form=ImportForm()
    )


@bp.post("/stimulus-sets")
def import_set():
    """Import a stimulus set from a folder on the server (contract 1; manifest optional)."""
    from study_app.stimuli import import_stimulus_set, resolve_import_path

    form = ImportForm()
    if not form.validate_on_submit():
        flash("Give the folder of a stimulus set.", "error")
        return redirect(url_for("researcher.index")), 303
    try:
        folder = resolve_import_path(form.path.data)
        stimulus_set = import_stimulus_set(folder, owner_id=current_researcher().id)
        db.session.commit()
    except (ValueError, OSError) as error:
        db.session.rollback()
        flash(f"Could not import {form.path.data!r}: {error}", "error")
        return redirect(url_for("researcher.index")), 303
    flash(f"Imported stimulus set '{stimulus_set.name}'.", "success")
    return redirect(url_for("researcher.new_study", set=stimulus_set.id)), 303


@bp.route("/studies/new", methods=["GET", "POST"])
def new_study():
    """The creation form for a study over the stimulus set ``?set=<id>``; the study is
    owned by the researcher who creates it."""
    stimulus_set = _set_from_query()
    if stimulus_set is None:
        sets = db.session.scalars(
            access.usable_sets(current_researcher()).order_by(StimulusSet.imported_at.desc())
        ).all()
        if len(sets) == 1:
            stimulus_set = sets[0]
        else:
            return render_template("researcher/choose_set.html", sets=sets)
    form = StudyForm()
    form.conditions.choices = [c.name for c in stimulus_set.conditions]
    error = None
    if form.validate_on_submit():
        try:
            config = parse_config(config_from_form(form))
            study = create_study(stimulus_set, config, researcher_id=current_researcher().id)
            db.session.commit()
        except (StudyConfigError, TypeError) as problem:
            db.session.rollback()
            error = str(problem)
        else:
            flash(
                f"Study '{study.title}' created as a draft. Preview it, then start it.", "success"
            )
            for warning in design_summary(study, config)["warnings"]:
                flash(f"Check the design: {warning}", "warning")
            return redirect(url_for("researcher.dashboard", slug=study.slug)), 303
    elif request.method == "POST":
        error = "; ".join(
            f"{form[name].label.text}: {' '.join(messages)}"
            for name, messages in form.errors.items()
        )
    status = 400 if error else 200
    return render_template(
        "researcher/new_study.html",
        form=form,
        stimulus_set=stimulus_set,
        error=error,
        questions=QUESTIONS,
    ), status


@bp.get("/studies/<slug>")
def dashboard(slug: str):
    """The live dashboard (numbers refresh through dashboard.json), the status buttons
    (editors) and the people with access (sharing forms for the owner)."""
    study = _study_or_404(slug)
    role = access.study_role(current_researcher(), study)
    config = study_config(study)
    participant_link = url_for("participant.study_page", slug=study.slug, _external=True)
    return render_template(
        "researcher/dashboard.html",
        study=study,
        config=config,
        data=dashboard_data(study),
        status_form=StatusForm(),
        participant_link=participant_link,
        actions=_allowed_actions(study) if access.allows(role, EDIT) else [],
        role=role,
        can_manage=access.allows(role, MANAGE),
        collaborators=access.collaborators(study),
        share_form=ShareForm(),
        unshare_form=UnshareForm(),
        refresh_ms=int(current_app.config.get("DASHBOARD_REFRESH_MS", DASHBOARD_REFRESH_MS)),
    )


@bp.get("/studies/<slug>/dashboard.json")
def dashboard_json(slug: str):
    """The dashboard's numbers as JSON (polled by static/js/dashboard.js)."""
    return jsonify(dashboard_data(_study_or_404(slug)))


@bp.get("/studies/<slug>/preference.png")
def preference_plot(slug: str):
    """The preference matrix with intervals, drawn by ``analysis.plots``."""
    from analysis.plots import figure_png, preference_matrix_figure
    from analysis.report import pair_table

    study = _study_or_404(slug)
    begin_snapshot()
    table = pair_table(_included(study_responses(db.session.get(Study, study.id))))
    figure = preference_matrix_figure(table)
    response = Response(figure_png(figure), mimetype="image/png")
    response.headers["Cache-Control"] = "no-store"
    return response


PROLIFIC_ACTIONS = ("approve", "reject")


@bp.get("/studies/<slug>/participants.csv")
def download_participants(slug: str):
    """The participant list (as on the dashboard) as CSV, one row per participant."""
    import csv
    import io

    study = _study_or_404(slug)
    rows = dashboard_data(study)["people"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(PARTICIPANT_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row[k] is None else row[k]) for k in PARTICIPANT_COLUMNS})
    response = Response(buffer.getvalue(), mimetype="text/csv")
    response.headers["Content-Disposition"] = (
        f'attachment; filename="{_download_name(study, "participants.csv")}"')
    return response


@bp.get("/studies/<slug>/prolific-<decision>.txt")
def download_prolific_ids(slug: str, decision: str):
    """The PROLIFIC_PIDs whose suggested action is ``decision`` (approve or reject), one
    per line: what Prolific's bulk approve / bulk reject boxes take."""
    study = _study_or_404(slug)
    if decision not in PROLIFIC_ACTIONS:
        abort(404, description=f"no such list; choose one of {', '.join(PROLIFIC_ACTIONS)}")
    ids = [row["prolific_pid"] for row in dashboard_data(study)["people"]
           if row["suggested_action"] == decision and row["prolific_pid"]]
    response = Response("".join(f"{pid}\n" for pid in ids), mimetype="text/plain")
    response.headers["Content-Disposition"] = (
        f'attachment; filename="{_download_name(study, f"prolific-{decision}.txt")}"')
    return response


def _allowed_actions(study: Study) -> list[str]:
    from study_app.studies import TRANSITIONS

    allowed = TRANSITIONS[study.status]
    actions = []
    for action, target in STATUS_ACTIONS.items():
        if (
            target in allowed
            and not (action == "start" and study.status == "paused")
            and not (action == "resume" and study.status == "draft")
        ):
            actions.append(action)
    return actions


@bp.post("/studies/<slug>/status/<action>")
def change_status(slug: str, action: str):
    """start / pause / resume / close (POST with the CSRF token; editors and up)."""
    study = _study_or_404(slug, EDIT)
    form = StatusForm()
    if action not in STATUS_ACTIONS:
        abort(404, description=f"Unknown action {action!r}; use one of {list(STATUS_ACTIONS)}.")
    if not form.validate_on_submit():
        abort(400, description="The form expired; reload the page and try again.")
    try:
        set_status(study, STATUS_ACTIONS[action])
        db.session.commit()
    except StudyConfigError as error:
        db.session.rollback()
        flash(str(error), "error")
        return redirect(url_for("researcher.dashboard", slug=slug)), 303
    flash(f"The study is now {study.status}.", "success")
    return redirect(url_for("researcher.dashboard", slug=slug)), 303


@bp.post("/studies/<slug>/collaborators")
def share(slug: str):
    """Share the study with a researcher by e-mail as viewer or editor, or change their
    role (the owner and admins)."""
    study = _study_or_404(slug, MANAGE)
    form = ShareForm()
    if not form.validate_on_submit():
        flash("Give the e-mail of a researcher and a role (viewer or editor).", "error")
        return redirect(url_for("researcher.dashboard", slug=slug)), 303
    try:
        researcher, outcome = access.share_study(study, form.email.data, form.role.data)
        db.session.commit()
    except access.AccessError as error:
        db.session.rollback()
        flash(f"Not shared: {error}.", "error")
        return redirect(url_for("researcher.dashboard", slug=slug)), 303
    flash(f"{researcher.email} is {_article(form.role.data)} {form.role.data} of this study"
          f"{' now' if outcome == 'changed' else ''}.", "success")
    return redirect(url_for("researcher.dashboard", slug=slug)), 303


@bp.post("/studies/<slug>/collaborators/remove")
def unshare(slug: str):
    """Take a collaborator's access away (the owner and admins)."""
    study = _study_or_404(slug, MANAGE)
    form = UnshareForm()
    if not form.validate_on_submit():
        flash("Say whose access to remove.", "error")
        return redirect(url_for("researcher.dashboard", slug=slug)), 303
    try:
        researcher = access.unshare_study(study, form.email.data)
        db.session.commit()
    except access.AccessError as error:
        db.session.rollback()
        flash(f"Nothing removed: {error}.", "error")
        return redirect(url_for("researcher.dashboard", slug=slug)), 303
    flash(f"{researcher.email} no longer has access to this study.", "success")
    return redirect(url_for("researcher.dashboard", slug=slug)), 303


@bp.get("/studies/<slug>/preview")
def preview(slug: str):
    """The participant page as a participant sees it; answers are stored as a preview."""
    return render_study_page(_study_or_404(slug), preview=True)


# --------------------------------------------------------------------------- downloads


def _download_name(study: Study, suffix: str) -> str:
    return f"{study.slug}-{suffix}"


@bp.get("/studies/<slug>/responses.<fmt>")
def download_responses(slug: str, fmt: str):
    """All responses (contract 2) as CSV (streamed in batches) or Parquet (with provenance
    in the schema metadata), written by :mod:`study_app.export`."""
    from study_app import export

    study = _study_or_404(slug)
    if fmt not in ("csv", "parquet"):
        abort(404, description=f"Responses come as .csv or .parquet, not .{fmt}.")
    name = _download_name(study, f"responses.{fmt}")
    engine = db.engine
    if fmt == "csv":

        def chunks():
            with engine.connect() as connection:
                yield from export.iter_csv_chunks(connection, study.id)

        response = Response(stream_with_context(chunks()), mimetype="text/csv")
        response.headers["Content-Disposition"] = f'attachment; filename="{name}"'
        return response
    handle = tempfile.NamedTemporaryFile(suffix=".parquet")  # removed when closed
    with engine.connect() as connection:
        export.write_parquet(connection, study.id, handle.name)
    handle.seek(0)
    return send_file(
        handle, mimetype="application/vnd.apache.parquet", as_attachment=True, download_name=name
    )


@bp.get("/studies/<slug>/config.json")
def download_config(slug: str):
    """The study's full configuration with its hash and the stimulus set's identity."""
    study = _study_or_404(slug)
    stimulus_set = study.stimulus_set
    document = {
        "study": study.slug,
        "title": study.title,
        "status": study.status,
        "created_at": study.created_at.isoformat(),
        "config": study.config,
        "config_sha256": study.config_sha256,
        "stimulus_set": {
            "name": stimulus_set.name,
            "manifest_sha256": stimulus_set.manifest_sha256,
            "manifest_inferred": stimulus_set.manifest_inferred,
            "image_size": [stimulus_set.image_height, stimulus_set.image_width],
        },
    }
    return _json_download(document, _download_name(study, "config.json"))


@bp.get("/studies/<slug>/manifest.json")
def download_manifest(slug: str):
    """The stimulus manifest (contract 1, with every file's sha256) the study used."""
    study = _study_or_404(slug)
    return _json_download(study.stimulus_set.manifest, _download_name(study, "manifest.json"))


def _json_download(document: Any, name: str) -> Response:
    body = json.dumps(document, indent=2, sort_keys=True, default=str) + "\n"
    response = Response(body, mimetype="application/json")
    response.headers["Content-Disposition"] = f'attachment; filename="{name}"'
    return response
