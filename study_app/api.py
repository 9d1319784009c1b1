"""The participant JSON API (``/api/v1``), described by ``/api/v1/openapi.json``.

Thin HTTP layer: parse and validate the request (malformed → 400 before any database
write), authenticate the participant (``Authorization: Bearer <participant token>``),
run the rule in :mod:`study_app.scheduling` in one write transaction, answer JSON.
Errors are ``{"error": message, "code": code, "status": status}``; docs/study_api.md
lists every endpoint, field and code.
"""

from __future__ import annotations

import json
import math
import random
import re
import secrets
from datetime import UTC, datetime
from functools import cache
from typing import Any

from flask import Blueprint, jsonify, request
from sqlalchemy import bindparam, select
from sqlalchemy.exc import IntegrityError
from werkzeug.exceptions import HTTPException

from study_app import calibration, scheduling
from study_app.access import may
from study_app.auth import current_researcher
from study_app.errors import ApiError
from study_app.extensions import db
from study_app.i18n import study_language
from study_app.models import Image, Participant, Study, Trial
from study_app.openapi import openapi_document
from study_app.scheduling import (
    CHOICES,
    JND_ANSWERS,
    SEQUENCE_FIELDS,
    TIMING_FIELDS,
    ExposureTiming,
    SequenceTiming,
    VoteInput,
)
from study_app.stimuli import media_url
from study_app.studies import MAX_EXPOSURE_MS, StudyConfig, study_config
from study_app.transactions import DatabaseBusy, run_on_connection, run_write

bp = Blueprint("api", __name__, url_prefix="/api/v1")

VOTE_MAX_BYTES = 4096  # a vote is ~300 bytes of JSON
START_MAX_BYTES = 4096
MAX_RT_MS = 600_000.0  # 10 minutes
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_PROLIFIC = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
VOTE_FIELDS = ("trial_token", "choice", "rt_ms", "presented_at", "answered_at", "viewport_w",
               "viewport_h", "device_pixel_ratio")
# Frame-timed exposure: optional, but all six together (docs/study_api.md).
FRAME_PERIOD_MS = (2.0, 200.0)  # 500 Hz .. 5 Hz displays
MAX_FRAMES = 100_000
MAX_PAGE_CLOCK_MS = 1e10  # performance.now() of a page open for ~115 days
# The display report (POST /participant/display): what a page may plausibly measure.
DISPLAY_FIELDS = ("device_pixel_ratio", "screen_w", "screen_h", "zoom_estimate",
                  "card_width_px", "blind_spot_px")
CARD_WIDTH_PX = (40.0, 4000.0)  # CSS px: 0.5 .. 47 px/mm
BLIND_SPOT_PX = (20.0, 8000.0)
ZOOM_RANGE = (0.25, 5.0)  # browsers zoom 25 % .. 500 %
DISTANCE_MM = (100.0, 3000.0)  # a viewing distance outside 10 cm .. 3 m is a misreading


# --------------------------------------------------------------------------- errors


@bp.errorhandler(ApiError)
def _api_error(error: ApiError):
    return jsonify(error.to_dict()), error.status


@bp.errorhandler(DatabaseBusy)
def _busy(_error: DatabaseBusy):
    response = jsonify(error="the database is busy; retry in a moment", code="database_busy",
                       status=503)
    response.status_code = 503
    response.headers["Retry-After"] = "1"
    return response


@bp.errorhandler(HTTPException)
def _http_error(error: HTTPException):
    code = (error.name or "error").lower().replace(" ", "_")
    response = jsonify(error=error.description or error.name, code=code, status=error.code)
    response.status_code = error.code or 500
    return response


# --------------------------------------------------------------------------- parsing


class _DuplicateKey(ValueError):
    """A JSON object names one key twice (neither value may win silently)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicated = sorted({key for key in keys if keys.count(key) > 1})
        raise _DuplicateKey(f"the key(s) {duplicated} appear more than once in one object")
    return dict(pairs)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A JSON object from ``raw``, strictly: UTF-8, no duplicate keys, no NaN/Infinity,
    no nesting past what the JSON decoder can follow (any of these → ApiError 400)."""
    try:
        body = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys,
                          parse_constant=_reject_constant)
    except _DuplicateKey as error:
        raise ApiError(400, "malformed_json", f"{error}; send each field once") from None
    except (ValueError, RecursionError):  # also UnicodeDecodeError, too-long integers
        raise ApiError(400, "malformed_json",
                       "the request body is not valid JSON (UTF-8, no NaN/Infinity, "
                       "a flat object of fields)") from None
    if not isinstance(body, dict):
        raise ApiError(400, "malformed_json", "the request body must be a JSON object")
    return body


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def json_body(max_bytes: int, required: bool = True) -> dict[str, Any]:
    """The request's JSON object, or an ApiError (413 too large, 415 not JSON, 400 bad:
    see :func:`parse_json_object`)."""
    length = request.content_length
    if length is not None and length > max_bytes:
        raise ApiError(413, "payload_too_large",
                       f"request body of {length} bytes is over the {max_bytes}-byte limit")
    raw = request.get_data(cache=True)
    if len(raw) > max_bytes:
        raise ApiError(413, "payload_too_large",
                       f"request body is over the {max_bytes}-byte limit")
    if not raw.strip():
        if required:
            raise ApiError(400, "malformed_json", "send a JSON object as the request body")
        return {}
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type",
                       "send the body with Content-Type: application/json")
    return parse_json_object(raw)


def _number(body: dict, name: str, low: float, high: float, integer: bool = False) -> float:
    value = body.get(name)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and isinstance(value, float):
        ok = math.isfinite(value) and (value.is_integer() or not integer)
    if not ok or not (low <= value <= high):  # exact for ints of any size
        kind = "an integer" if integer else "a number"
        raise ApiError(400, "invalid_field", f"'{name}' must be {kind} in [{low:g}, {high:g}]",
                       field=name)
    return int(value) if integer else float(value)


def _timestamp(body: dict, name: str) -> datetime:
    value = body.get(name)
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None or not 2000 <= parsed.year <= 2199:
        raise ApiError(400, "invalid_field",
                       f"'{name}' must be an ISO 8601 time with a zone, e.g. "
                       "2025-01-31T12:00:00.123Z", field=name)
    return parsed.astimezone(UTC)


def _all_or_none(body: dict[str, Any], names: tuple[str, ...], what: str) -> bool:
    """Whether ``body`` has the fields ``names`` (all: True, none: False; else 400)."""
    if not any(name in body for name in names):
        return False
    missing = [name for name in names if name not in body]
    if missing:
        raise ApiError(400, "missing_field",
                       f"missing field(s) {missing}: the {what} fields {list(names)} come "
                       "all together or not at all", field=missing[0])
    return True


def parse_timing(body: dict[str, Any]) -> ExposureTiming | None:
    """The vote's frame-timed exposure fields: none of them (``None``) or all six,
    each in range, the offset not before the onset; else ApiError 400."""
    if not _all_or_none(body, TIMING_FIELDS, "exposure timing"):
        return None
    timing = ExposureTiming(
        exposure_requested_ms=_number(body, "exposure_requested_ms", 1.0, MAX_EXPOSURE_MS),
        frame_period_ms=_number(body, "frame_period_ms", *FRAME_PERIOD_MS),
        exposure_frames_requested=int(_number(body, "exposure_frames_requested", 1,
                                              MAX_FRAMES, integer=True)),
        exposure_onset_ms=_number(body, "exposure_onset_ms", 0.0, MAX_PAGE_CLOCK_MS),
        exposure_offset_ms=_number(body, "exposure_offset_ms", 0.0, MAX_PAGE_CLOCK_MS),
        exposure_frames_measured=int(_number(body, "exposure_frames_measured", 0, MAX_FRAMES,
                                             integer=True)),
    )
    if timing.exposure_offset_ms < timing.exposure_onset_ms:
        raise ApiError(400, "invalid_field",
                       "'exposure_offset_ms' is before 'exposure_onset_ms' (both are "
                       "requestAnimationFrame timestamps of the same page)",
                       field="exposure_offset_ms")
    return timing


def parse_sequence(body: dict[str, Any], timing: ExposureTiming | None) -> SequenceTiming | None:
    """A sequential trial's interval and second-image fields: none (``None``) or all six,
    in range, after the first image (``timing``, required with them); else ApiError 400."""
    if not _all_or_none(body, SEQUENCE_FIELDS, "sequential timing"):
        return None
    if timing is None:
        raise ApiError(400, "missing_field",
                       f"the sequential timing fields need the exposure timing fields "
                       f"{list(TIMING_FIELDS)} of the first image", field=TIMING_FIELDS[0])
    sequence = SequenceTiming(
        isi_requested_ms=_number(body, "isi_requested_ms", 0.0, MAX_EXPOSURE_MS),
        second_requested_ms=_number(body, "second_requested_ms", 1.0, MAX_EXPOSURE_MS),
        second_frames_requested=int(_number(body, "second_frames_requested", 1, MAX_FRAMES,
                                            integer=True)),
        second_onset_ms=_number(body, "second_onset_ms", 0.0, MAX_PAGE_CLOCK_MS),
        second_offset_ms=_number(body, "second_offset_ms", 0.0, MAX_PAGE_CLOCK_MS),
        second_frames_measured=int(_number(body, "second_frames_measured", 0, MAX_FRAMES,
                                           integer=True)),
    )
    if sequence.second_onset_ms < timing.exposure_offset_ms:
        raise ApiError(400, "invalid_field",
                       "'second_onset_ms' is before 'exposure_offset_ms' (the second image "
                       "follows the first)", field="second_onset_ms")
    if sequence.second_offset_ms < sequence.second_onset_ms:
        raise ApiError(400, "invalid_field",
                       "'second_offset_ms' is before 'second_onset_ms'",
                       field="second_offset_ms")
    return sequence


def parse_vote(body: dict[str, Any]) -> VoteInput:
    """Validate a vote body (fields of VOTE_FIELDS required, the exposure timing fields
    all or none, then the sequential ones all or none, no others); raise ApiError 400.
    Whether the choice fits the study's task is judged when it is stored (400 there)."""
    unknown = sorted(set(body) - set(VOTE_FIELDS) - set(TIMING_FIELDS) - set(SEQUENCE_FIELDS))
    if unknown:
        raise ApiError(400, "unknown_field",
                       f"unknown field(s) {unknown}; a vote has {list(VOTE_FIELDS)} and "
                       f"optionally {list(TIMING_FIELDS)}, then {list(SEQUENCE_FIELDS)}",
                       field=unknown[0])
    missing = [name for name in VOTE_FIELDS if name not in body]
    if missing:
        raise ApiError(400, "missing_field", f"missing field(s) {missing}", field=missing[0])
    token = body["trial_token"]
    if not isinstance(token, str) or not _TOKEN.match(token):
        raise ApiError(400, "invalid_field", "'trial_token' must be the token of a trial",
                       field="trial_token")
    if body["choice"] not in CHOICES + JND_ANSWERS:
        raise ApiError(400, "invalid_field",
                       "'choice' must be \"left\" or \"right\" (a 2afc study; sequential: "
                       "first = left) or \"same\" or \"different\" (a jnd study)",
                       field="choice")
    presented_at = _timestamp(body, "presented_at")
    answered_at = _timestamp(body, "answered_at")
    if answered_at < presented_at:
        raise ApiError(400, "invalid_field", "'answered_at' is before 'presented_at'",
                       field="answered_at")
    return VoteInput(
        trial_token=token, choice=body["choice"],
        rt_ms=_number(body, "rt_ms", 0.0, MAX_RT_MS),
        presented_at=presented_at, answered_at=answered_at,
        viewport_w=int(_number(body, "viewport_w", 1, 100_000, integer=True)),
        viewport_h=int(_number(body, "viewport_h", 1, 100_000, integer=True)),
        device_pixel_ratio=_number(body, "device_pixel_ratio", 0.1, 16.0),
        timing=(timing := parse_timing(body)),
        sequence=parse_sequence(body, timing),
    )


def parse_display(body: dict[str, Any],
                  req: calibration.DisplayRequirements) -> calibration.DisplayReport:
    """Validate a display report against what the study offers (the card step only when
    ``mode`` is not off, required when it is required; the blind-spot step likewise, and
    only after the card); raise ApiError 400 naming the field."""
    unknown = sorted(set(body) - set(DISPLAY_FIELDS))
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown field(s) {unknown}; a display report "
                       f"has {list(DISPLAY_FIELDS)}", field=unknown[0])
    missing = [name for name in ("device_pixel_ratio", "screen_w", "screen_h")
               if name not in body]
    if missing:
        raise ApiError(400, "missing_field", f"missing field(s) {missing}", field=missing[0])
    if "blind_spot_px" in body and "card_width_px" not in body:
        raise ApiError(400, "missing_field", "'blind_spot_px' needs 'card_width_px' (the "
                       "distance is measured in millimetres)", field="card_width_px")
    _fits_study(body, req)
    zoom = body.get("zoom_estimate")
    report = calibration.DisplayReport(
        device_pixel_ratio=_number(body, "device_pixel_ratio", 0.1, 16.0),
        screen_w=int(_number(body, "screen_w", 1, 100_000, integer=True)),
        screen_h=int(_number(body, "screen_h", 1, 100_000, integer=True)),
        zoom_estimate=None if zoom is None else _number(body, "zoom_estimate", *ZOOM_RANGE),
        card_width_px=(_number(body, "card_width_px", *CARD_WIDTH_PX)
                       if "card_width_px" in body else None),
        blind_spot_px=(_number(body, "blind_spot_px", *BLIND_SPOT_PX)
                       if "blind_spot_px" in body else None),
    )
    if report.blind_spot_px is not None:
        distance = calibration.viewing_distance_mm(
            report.blind_spot_px, calibration.px_per_mm(report.card_width_px))
        if not DISTANCE_MM[0] <= distance <= DISTANCE_MM[1]:
            raise ApiError(422, "implausible_distance",
                           f"the blind spot at {report.blind_spot_px:g} px means a viewing "
                           f"distance of {distance:.0f} mm, outside {DISTANCE_MM[0]:g}.."
                           f"{DISTANCE_MM[1]:g} mm: measure again (press the key the moment "
                           "the dot disappears)", field="blind_spot_px")
    return report


def _fits_study(body: dict[str, Any], req: calibration.DisplayRequirements) -> None:
    """The steps a report carries match the study's settings, else ApiError 422."""
    steps = {"card_width_px": req.mode, "blind_spot_px": "off" if req.mode == "off"
             else req.viewing_distance}
    names = {"card_width_px": "card calibration", "blind_spot_px": "viewing distance"}
    for name, mode in steps.items():
        needed = mode == "required" and (name == "card_width_px" or "card_width_px" in body)
        if (mode == "off" and name in body) or (needed and name not in body):
            raise ApiError(422, "calibration_mismatch",
                           f"this study's {names[name]} is {mode}: "
                           + ("send no" if mode == "off" else "send") + f" '{name}'",
                           field=name)


# --------------------------------------------------------------------------- helpers


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _study_or_404(slug: str) -> Study:
    study = db.session.scalars(select(Study).where(Study.slug == slug)).first()
    if study is None:
        raise ApiError(404, "unknown_study", f"no study is called {slug!r}")
    return study


def _bearer_token() -> str:
    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if not _TOKEN.match(token):
        raise ApiError(401, "unauthorized",
                       "send the participant token as 'Authorization: Bearer <token>'")
    return token


@cache
def _participant_by_token(lock: bool = False):
    query = select(Participant).where(Participant.token == bindparam("token"))
    return query.with_for_update().execution_options(populate_existing=True) if lock else query


def _authenticated(lock: bool = False) -> tuple[Participant, Study, StudyConfig]:
    """The participant of the request's bearer token, their study and its config (401
    for a token that is not valid). ``lock``: the participant's row locked for this
    (write) transaction, as :func:`scheduling.lock_participant` locks it."""
    token = _bearer_token()
    participant = db.session.scalars(_participant_by_token(lock), {"token": token}).first()
    if participant is None:
        raise ApiError(401, "unauthorized", "the participant token is not valid")
    study = db.session.get(Study, participant.study_id)
    return participant, study, study_config(study)


def _progress(participant: Participant, config: StudyConfig) -> dict[str, int]:
    return {"answered": participant.n_answered, "total": scheduling.planned_total(config)}


def participant_json(participant: Participant, study: Study, config: StudyConfig) -> dict:
    return {
        "id": participant.public_id, "token": participant.token, "status": participant.status,
        "study": study.slug, "preview": participant.preview,
        "progress": _progress(participant, config),
        "display": display_json(participant),
    }


def display_json(participant: Participant) -> dict:
    """The participant's latest display check (status None: none reported yet)."""
    return {
        "status": participant.display_status, "attempts": participant.display_attempts or 0,
        "px_per_mm": participant.px_per_mm, "viewing_distance_mm": participant.viewing_distance_mm,
        "px_per_deg": participant.px_per_deg, "scaling_ok": participant.display_scaling_ok,
    }


def trial_json(trial: Trial, config: StudyConfig, reference_sha: str | None) -> dict:
    """What the page needs for a trial; the conditions stay on the server (blinding)."""
    return {
        "token": trial.token,
        "reference_url": media_url(reference_sha) if config.reference_shown else None,
        "left_url": media_url(trial.left_sha256),
        "right_url": media_url(trial.right_sha256),
        "expires_at": _iso(trial.expires_at),
    }


def _practice(study: Study, config: StudyConfig) -> list[dict]:
    """Practice trials: the reference itself against a reconstruction (answer known; jnd:
    "different", or "same" when the reference is shown twice)."""
    from study_app.models import Stimulus

    if config.practice_trials == 0:
        return []
    rng = random.Random(f"practice:{config.seed}:{study.slug}")
    rows = db.session.execute(
        select(Stimulus.sha256, Image.sha256).join(Image, Stimulus.image_id == Image.id)
        .where(Stimulus.stimulus_set_id == study.stimulus_set_id)
        .order_by(Stimulus.id).limit(200)
    ).all()
    practice = []
    for stimulus_sha, reference_sha in rng.sample(rows, min(config.practice_trials, len(rows))):
        if config.task == "jnd":  # a reconstruction or (one time in three) the reference again
            same = rng.random() < 1 / 3
            practice.append({
                "reference_url": None, "left_url": media_url(reference_sha),
                "right_url": media_url(reference_sha if same else stimulus_sha),
                "correct": "same" if same else "different",
            })
            continue
        reference_left = rng.random() < 0.5
        left, right = ((reference_sha, stimulus_sha) if reference_left
                       else (stimulus_sha, reference_sha))
        practice.append({
            "reference_url": media_url(reference_sha) if config.reference_shown else None,
            "left_url": media_url(left), "right_url": media_url(right),
            "correct": "left" if reference_left else "right",
        })
    return practice


def study_json(study: Study, config: StudyConfig) -> dict:
    """The public description of a study (what a participant page shows), its texts in
    the study's language."""
    with study_language(config.language):
        return _study_json(study, config)


def _study_json(study: Study, config: StudyConfig) -> dict:
    stimulus_set = study.stimulus_set
    return {
        "slug": study.slug, "title": study.title, "status": study.status,
        "question": config.question_text, "question_mode": config.question_mode,
        "reference_shown": config.reference_shown, "instructions": config.instructions_text,
        "break_every": config.break_every,
        "consent": config.consent_text, "language": config.language,
        "display": {
            "image_size": [stimulus_set.image_height, stimulus_set.image_width],
            "scale": config.display_scale, "pixelated": config.pixelated,
            "exposure_ms": config.exposure_ms, "min_viewport_w": config.min_viewport_w,
            "presentation": config.presentation,
            "sequence": {"first_ms": config.first_ms, "isi_ms": config.isi_ms,
                         "second_ms": config.second_ms, "isi_mask": config.isi_mask}
            if config.sequential else None,
        },
        "task": config.task,
        "calibration": config.calibration.to_public(),
        "trials_total": scheduling.planned_total(config),
        "batch_size": config.batch_size,
        "practice": _practice(study, config),
    }


# --------------------------------------------------------------------------- routes


@bp.get("/openapi.json")
def openapi():
    """The OpenAPI 3.1 document of this API."""
    return jsonify(openapi_document())


@bp.get("/studies/<slug>")
def get_study(slug: str):
    study = _study_or_404(slug)
    if study.status == "draft" and not may(current_researcher(), study):
        raise ApiError(404, "unknown_study", f"no study is called {slug!r}")
    return jsonify(study=study_json(study, study_config(study)))


@bp.post("/studies/<slug>/participants")
def start(slug: str):
    """Start, or resume (same PROLIFIC_PID or participant token), a participation."""
    body = json_body(START_MAX_BYTES, required=False)
    allowed = {"prolific_pid", "study_id", "session_id", "participant_token", "preview"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown field(s) {unknown}; allowed: "
                       f"{sorted(allowed)}", field=unknown[0])
    for name in ("prolific_pid", "study_id", "session_id"):
        value = body.get(name)
        if value is not None and not (isinstance(value, str) and _PROLIFIC.match(value)):
            raise ApiError(400, "invalid_field",
                           f"'{name}' must be 1-64 letters, digits, '_' or '-'", field=name)
    preview = body.get("preview", False)
    if not isinstance(preview, bool):
        raise ApiError(400, "invalid_field", "'preview' must be true or false", field="preview")
    if preview and current_researcher() is None:
        raise ApiError(403, "preview_needs_login", "log in as a researcher to preview a study")
    study = _study_or_404(slug)
    if preview and not may(current_researcher(), study):  # a stranger to this study
        raise ApiError(404, "unknown_study", f"no study is called {slug!r}")
    config = study_config(study)

    existing = None
    token = body.get("participant_token")
    if token is not None:
        if not isinstance(token, str) or not _TOKEN.match(token):
            raise ApiError(400, "invalid_field", "'participant_token' is malformed",
                           field="participant_token")
        existing = db.session.scalars(select(Participant).where(
            Participant.token == token, Participant.study_id == study.id)).first()
        if existing is None:
            raise ApiError(404, "unknown_participant",
                           "no participant of this study has this token; start without it")
    elif body.get("prolific_pid") and not preview:
        existing = db.session.scalars(select(Participant).where(
            Participant.study_id == study.id,
            Participant.prolific_pid == body["prolific_pid"])).first()
    if existing is not None:
        return jsonify(participant=participant_json(existing, study, config), resumed=True)

    if study.status != "live" and not preview:
        code = "study_closed" if study.status == "closed" else "study_not_live"
        raise ApiError(409, code, f"this study is {study.status} and accepts no new "
                       "participants")

    def create() -> Participant:
        participant = Participant(
            study_id=study.id, public_id="p" + secrets.token_hex(8),
            token=secrets.token_urlsafe(24),
            prolific_pid=None if preview else body.get("prolific_pid"),
            prolific_study_id=body.get("study_id"), prolific_session_id=body.get("session_id"),
            status="started", preview=preview, n_answered=0, n_issued=0,
            user_agent=(request.user_agent.string or "")[:400],
        )
        db.session.add(participant)
        db.session.flush()
        return participant

    try:
        participant = run_write(create)
    except IntegrityError:  # the same PROLIFIC_PID raced in: resume that participant
        db.session.rollback()
        participant = db.session.scalars(select(Participant).where(
            Participant.study_id == study.id,
            Participant.prolific_pid == body.get("prolific_pid"))).one()
        return jsonify(participant=participant_json(participant, study, config), resumed=True)
    return jsonify(participant=participant_json(participant, study, config),
                   resumed=False), 201


@bp.get("/participant")
def me():
    participant, study, config = _authenticated()
    return jsonify(participant=participant_json(participant, study, config),
                   study_status=study.status)


@bp.post("/participant/trials/next")
def next_trials():
    """The open trials, topped up with new leases (idempotent while trials are open)."""
    unknown = sorted(json_body(START_MAX_BYTES, required=False))
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown field(s) {unknown}; send {{}} or no "
                       "body", field=unknown[0])
    _bearer_token()  # 401 for a malformed header before any transaction

    def lease_and_answer() -> dict:
        # authenticated inside the write transaction: the participant's row is read once,
        # locked, and the study once (no read transaction before it to end and re-read)
        participant, study, config = _authenticated(lock=True)
        if config.calibration.check_needed and participant.display_status != "passed":
            raise ApiError(409, "display_check_needed",
                           "this study checks the display before the trials: send a "
                           "passing report to /participant/display first")
        # the answer is built before the commit, from the rows this transaction holds:
        # after it every row would be expired and re-read, one statement per trial
        trials, done = scheduling.lease_trials(participant.id, study, config,
                                               locked=participant)
        references = (scheduling.image_shas([t.image_id for t in trials])
                      if config.reference_shown else {})
        return {"trials": [trial_json(t, config, references.get(t.image_id)) for t in trials],
                "done": done, "study_status": study.status,
                "progress": _progress(participant, config)}

    return jsonify(run_write(lease_and_answer))


@bp.post("/participant/votes")
def vote():
    """Store one vote, exactly once per trial token (a replay answers the same)."""
    token = _bearer_token()  # 401 before any look at the body
    body = json_body(VOTE_MAX_BYTES)
    parsed = parse_vote(body)
    # no `now` taken here: expiry is judged at the time read once the locks are held
    # (scheduling.write_time), not before the request waited for them

    def store_any() -> tuple[dict, bool]:  # any vote, answered precisely
        participant, study, config = _authenticated()
        stored, replayed = scheduling.record_vote(participant.id, study, parsed,
                                                  config.reference_shown)
        return {"choice": stored.choice, "trial_index": stored.trial_index,
                "received_at": stored.received_at}, replayed

    # the common case (a fresh vote on an open lease) on a Core connection, one transaction
    if db.engine.dialect.name == "postgresql":
        answer = run_on_connection(lambda connection: scheduling.record_vote_postgresql(
            connection, token, parsed), autocommit=True)
    else:
        answer = run_on_connection(lambda connection: scheduling.record_vote_sqlite(
            connection, token, parsed))
    # anything else (replay, conflict, expired, finished, closed, unknown) answered precisely
    answer, replayed = (answer, False) if answer is not None else run_write(store_any)
    response = jsonify(vote={"trial_token": parsed.trial_token, "choice": answer["choice"],
                             "trial_index": answer["trial_index"],
                             "received_at": _iso(answer["received_at"])})
    if replayed:
        response.headers["X-Idempotent-Replay"] = "true"
    return response


@bp.post("/participant/display")
def display():
    """Record the participant's display check (the latest report wins) and answer the
    server's verdict: px/mm, viewing distance, px/deg, and the problems to fix."""
    _bearer_token()  # 401 before any look at the body
    body = json_body(START_MAX_BYTES)
    participant, study, config = _authenticated()
    report = parse_display(body, config.calibration)
    verdict = calibration.check_display(report, config.calibration)
    participant_id = participant.id

    def store() -> Participant:
        row = scheduling.lock_participant(participant_id)
        if row.status != "started":
            raise ApiError(409, "participant_finished",
                           f"this participation is already {row.status}")
        row.display_status = "passed" if verdict.passed else "failed"
        row.display_attempts = (row.display_attempts or 0) + 1
        row.display_checked_at = datetime.now(UTC)
        row.display_dpr = report.device_pixel_ratio
        row.display_screen_w, row.display_screen_h = report.screen_w, report.screen_h
        row.display_zoom = report.zoom_estimate
        row.display_scaling_ok = verdict.scaling_ok
        row.card_width_px, row.px_per_mm = report.card_width_px, verdict.px_per_mm
        row.blind_spot_px = report.blind_spot_px
        row.viewing_distance_mm, row.px_per_deg = verdict.viewing_distance_mm, verdict.px_per_deg
        return row

    participant = run_write(store)
    return jsonify(display={
        **display_json(participant), "passed": verdict.passed,
        "problems": [{"code": code, "message": message} for code, message in verdict.problems],
    })


@bp.post("/participant/finish")
def finish():
    """Finish as completed (gets the completion code / redirect) or returned."""
    body = json_body(START_MAX_BYTES, required=False)
    status = body.get("status", "completed")
    if status not in ("completed", "returned") or set(body) - {"status"}:
        raise ApiError(400, "invalid_field",
                       "send {\"status\": \"completed\"} or {\"status\": \"returned\"}",
                       field="status")
    participant, study, config = _authenticated()
    participant_id = participant.id
    participant = run_write(lambda: scheduling.finish(participant_id, study, config, status))
    completed = participant.status == "completed"
    return jsonify(
        participant=participant_json(participant, study, config),
        completion_code=config.completion_code if completed else None,
        redirect_url=config.completion_url if completed else None,
    )


def init_app(app) -> None:
    """Register the API and the media routes."""
    from study_app import stimuli

    app.register_blueprint(bp)
    app.register_blueprint(stimuli.bp)
