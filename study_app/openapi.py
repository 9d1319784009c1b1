"""The OpenAPI 3.1 document of the participant API, served at ``/api/v1/openapi.json``."""

from __future__ import annotations

from typing import Any

from study_app.scheduling import SEQUENCE_FIELDS as _SEQUENCE
from study_app.scheduling import TIMING_FIELDS as _TIMING

_ERROR_CODES = {
    400: "malformed_json, missing_field, unknown_field, invalid_field",
    401: "unauthorized (missing or invalid participant token)",
    403: "trial_not_assigned, preview_needs_login",
    404: "unknown_study, unknown_trial, unknown_participant",
    409: "vote_conflict, study_closed, study_not_live, participant_finished, trials_open, "
         "trials_remaining, display_check_needed",
    410: "trial_expired",
    413: "payload_too_large",
    422: "calibration_mismatch (the display report does not fit the study's calibration "
         "settings), implausible_distance (the blind spot gives a viewing distance outside "
         "10 cm .. 3 m)",
    415: "unsupported_media_type",
    429: "rate_limited: too many requests from this address (retry after the Retry-After "
         "header)",
    503: "database_busy (retry after the Retry-After header)",
}
_PARTICIPANT_ID = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}
_TOKEN = {"type": "string", "pattern": "^[A-Za-z0-9_-]{16,64}$"}
# RFC 3339 with a zone, years 2000-2199 (the server's sanity range)
_TIME = {"type": "string", "format": "date-time",
         "pattern": r"^2[01][0-9]{2}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}"
                    r"(\.[0-9]{1,6})?(Z|[+-][0-9]{2}:[0-9]{2})$"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    """The error responses of a participant route: ``statuses`` plus 429 (every
    participant route is rate limited per address)."""
    return {str(s): _json(_ref("Error"), _ERROR_CODES[s]) for s in (*statuses, 429)}


def _body(schema: dict[str, Any], required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error", "code", "status"],
        "properties": {
            "error": {"type": "string", "description": "what went wrong and how to fix it"},
            "code": {"type": "string", "description": "stable machine-readable code"},
            "status": {"type": "integer"},
            "field": {"type": "string", "description": "the request field at fault"},
        },
    },
    "Progress": {
        "type": "object", "required": ["answered", "total"],
        "properties": {"answered": {"type": "integer"}, "total": {"type": "integer"}},
    },
    "Participant": {
        "type": "object",
        "required": ["id", "token", "status", "study", "preview", "progress"],
        "properties": {
            "id": {"type": "string", "description": "anonymous id used in exports"},
            "token": {"type": "string", "description": "secret; send as Bearer token"},
            "status": {"enum": ["started", "completed", "returned"]},
            "study": {"type": "string"},
            "preview": {"type": "boolean"},
            "progress": _ref("Progress"),
            "display": _ref("DisplayCheck"),
        },
    },
    "DisplayCheck": {
        "type": "object",
        "description": "the latest display check (status null: none reported yet); CSS px",
        "properties": {
            "status": {"enum": ["passed", "failed", None]},
            "attempts": {"type": "integer"},
            "px_per_mm": {"type": ["number", "null"]},
            "viewing_distance_mm": {"type": ["number", "null"]},
            "px_per_deg": {"type": ["number", "null"]},
            "scaling_ok": {"type": ["boolean", "null"]},
        },
    },
    "DisplayRequest": {
        "type": "object", "additionalProperties": False,
        "required": ["device_pixel_ratio", "screen_w", "screen_h"],
        "properties": {
            "device_pixel_ratio": {"type": "number", "minimum": 0.1, "maximum": 16},
            "screen_w": {"type": "integer", "minimum": 1, "maximum": 100000},
            "screen_h": {"type": "integer", "minimum": 1, "maximum": 100000},
            "zoom_estimate": {"type": ["number", "null"], "minimum": 0.25, "maximum": 5,
                              "description": "browser zoom, 1 = 100 %; null: unknown"},
            "card_width_px": {"type": "number", "minimum": 40, "maximum": 4000,
                              "description": "matched ID-1 card outline width, CSS px"},
            "blind_spot_px": {"type": "number", "minimum": 20, "maximum": 8000,
                              "description": "fixation to blind spot, CSS px (needs "
                                             "card_width_px)"},
        },
        "dependentRequired": {"blind_spot_px": ["card_width_px"]},
    },
    "Trial": {
        "type": "object",
        "required": ["token", "reference_url", "left_url", "right_url", "expires_at"],
        "properties": {
            "token": {"type": "string"},
            "reference_url": {"type": ["string", "null"]},
            "left_url": {"type": "string"},
            "right_url": {"type": "string"},
            "expires_at": {"type": "string", "format": "date-time"},
        },
    },
    "PracticeTrial": {
        "type": "object",
        "properties": {
            "reference_url": {"type": ["string", "null"]}, "left_url": {"type": "string"},
            "right_url": {"type": "string"},
            "correct": {"enum": ["left", "right", "same", "different"]},
        },
    },
    "Study": {
        "type": "object",
        "properties": {
            "slug": {"type": "string"}, "title": {"type": "string"},
            "status": {"enum": ["draft", "live", "paused", "closed"]},
            "question": {"type": "string"},
            "question_mode": {"enum": ["reference", "no-reference"]},
            "reference_shown": {"type": "boolean"},
            "instructions": {"type": "string"}, "consent": {"type": "string"},
            "break_every": {"type": ["integer", "null"]},
            "language": {"type": "string", "description": "of the participant pages"},
            "display": {
                "type": "object",
                "properties": {
                    "image_size": {"type": "array", "items": {"type": "integer"}},
                    "scale": {"oneOf": [{"type": "integer"}, {"const": "auto"}]},
                    "pixelated": {"type": "boolean"},
                    "exposure_ms": {"type": ["integer", "null"]},
                    "min_viewport_w": {"type": ["integer", "null"]},
                    "presentation": {"enum": ["side-by-side", "sequential"]},
                    "sequence": {
                        "type": ["object", "null"],
                        "description": "sequential only: durations in ms, frame-timed",
                        "properties": {
                            "first_ms": {"type": "integer"}, "isi_ms": {"type": "integer"},
                            "second_ms": {"type": "integer"},
                            "isi_mask": {"enum": ["none", "grey", "noise"]},
                        },
                    },
                },
            },
            "task": {"enum": ["2afc", "jnd"]},
            "calibration": {
                "type": "object", "description": "display calibration settings",
                "properties": {
                    "mode": {"enum": ["off", "optional", "required"]},
                    "viewing_distance": {"enum": ["off", "optional", "required"]},
                    "min_px_per_deg": {"type": ["number", "null"]},
                    "require_unscaled": {"type": "boolean"},
                    "require_fullscreen": {"type": "boolean"},
                    "card_mm": {"type": "array", "items": {"type": "number"}},
                    "blind_spot_deg": {"type": "number"},
                },
            },
            "trials_total": {"type": "integer"}, "batch_size": {"type": "integer"},
            "practice": {"type": "array", "items": _ref("PracticeTrial")},
        },
    },
    "StartRequest": {
        "type": "object", "additionalProperties": False,
        "properties": {
            "prolific_pid": {**_PARTICIPANT_ID, "description": "PROLIFIC_PID URL parameter"},
            "study_id": {**_PARTICIPANT_ID, "description": "STUDY_ID URL parameter"},
            "session_id": {**_PARTICIPANT_ID, "description": "SESSION_ID URL parameter"},
            "participant_token": {**_TOKEN, "description": "resume this participant"},
            "preview": {"type": "boolean", "description": "researcher preview (needs login)"},
        },
    },
    "VoteRequest": {
        "type": "object", "additionalProperties": False,
        "required": ["trial_token", "choice", "rt_ms", "presented_at", "answered_at",
                     "viewport_w", "viewport_h", "device_pixel_ratio"],
        "properties": {
            "trial_token": _TOKEN,
            "choice": {"enum": ["left", "right", "same", "different"],
                       "description": "2afc: left/right (sequential: first = left); "
                                      "jnd: same/different"},
            "rt_ms": {"type": "number", "minimum": 0, "maximum": 600000},
            "presented_at": {**_TIME, "description": "with a zone; years 2000-2199"},
            "answered_at": {**_TIME, "description": "with a zone; not before presented_at"},
            "viewport_w": {"type": "integer", "minimum": 1, "maximum": 100000},
            "viewport_h": {"type": "integer", "minimum": 1, "maximum": 100000},
            "device_pixel_ratio": {"type": "number", "minimum": 0.1, "maximum": 16},
            # frame-timed limited exposure: all six or none
            "exposure_requested_ms": {"type": "number", "minimum": 1, "maximum": 60000},
            "frame_period_ms": {"type": "number", "minimum": 2, "maximum": 200},
            "exposure_frames_requested": {"type": "integer", "minimum": 1, "maximum": 100000},
            "exposure_onset_ms": {"type": "number", "minimum": 0, "maximum": 1e10,
                                  "description": "rAF timestamp (performance.now clock)"},
            "exposure_offset_ms": {"type": "number", "minimum": 0, "maximum": 1e10,
                                   "description": "not before exposure_onset_ms"},
            "exposure_frames_measured": {"type": "integer", "minimum": 0, "maximum": 100000},
            # sequential presentation: the interval and the second image, all six or none
            "isi_requested_ms": {"type": "number", "minimum": 0, "maximum": 60000},
            "second_requested_ms": {"type": "number", "minimum": 1, "maximum": 60000},
            "second_frames_requested": {"type": "integer", "minimum": 1, "maximum": 100000},
            "second_onset_ms": {"type": "number", "minimum": 0, "maximum": 1e10,
                                "description": "not before exposure_offset_ms"},
            "second_offset_ms": {"type": "number", "minimum": 0, "maximum": 1e10,
                                 "description": "not before second_onset_ms"},
            "second_frames_measured": {"type": "integer", "minimum": 0, "maximum": 100000},
        },
        "dependentRequired": {
            **{name: [other for other in _TIMING if other != name] for name in _TIMING},
            **{name: [other for other in (*_TIMING, *_SEQUENCE) if other != name]
               for name in _SEQUENCE},
        },
    },
    "VoteResponse": {
        "type": "object",
        "properties": {"vote": {
            "type": "object",
            "properties": {
                "trial_token": {"type": "string"},
                "choice": {"enum": ["left", "right", "same", "different"]},
                "trial_index": {"type": "integer"},
                "received_at": {"type": "string", "format": "date-time"},
            },
        }},
    },
}

_BEARER = [{"participantToken": []}]


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of ``/api/v1`` and the ``/media`` images."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Perceptual Study Platform participant API", "version": "1",
            "description": "Start or resume, fetch trials, vote exactly once, finish. "
                           "See docs/study_api.md.",
        },
        "servers": [{"url": "/"}],
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"participantToken": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/api/v1/openapi.json": {"get": {
                "summary": "This document",
                "responses": {"200": {"description": "the OpenAPI document"}},
            }},
            "/api/v1/studies/{slug}": {"get": {
                "summary": "The public description of a study",
                "parameters": [{"name": "slug", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"200": _json({"type": "object", "properties": {
                    "study": _ref("Study")}}, "the study"), **_errors(404)},
            }},
            "/api/v1/studies/{slug}/participants": {"post": {
                "summary": "Start a participation, or resume (same PROLIFIC_PID or token)",
                "parameters": [{"name": "slug", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "requestBody": _body(_ref("StartRequest"), required=False),
                "responses": {
                    "201": _json({"type": "object", "properties": {
                        "participant": _ref("Participant"), "resumed": {"const": False}}},
                        "a new participant"),
                    "200": _json({"type": "object", "properties": {
                        "participant": _ref("Participant"), "resumed": {"const": True}}},
                        "an existing participant resumed"),
                    **_errors(400, 403, 404, 409, 413, 415, 503),
                },
            }},
            "/api/v1/participant": {"get": {
                "summary": "The authenticated participant's status and progress",
                "security": _BEARER,
                "responses": {"200": _json({"type": "object", "properties": {
                    "participant": _ref("Participant"),
                    "study_status": {"type": "string"}}}, "the participant"),
                    **_errors(401)},
            }},
            "/api/v1/participant/trials/next": {"post": {
                "summary": "Open trials topped up to the batch size with new leases",
                "security": _BEARER,
                "requestBody": _body({"type": "object", "additionalProperties": False,
                                      "maxProperties": 0}, required=False),
                "responses": {"200": _json({"type": "object", "properties": {
                    "trials": {"type": "array", "items": _ref("Trial")},
                    "done": {"type": "boolean"}, "study_status": {"type": "string"},
                    "progress": _ref("Progress")}}, "the trials to show, in order"),
                    **_errors(400, 401, 409, 413, 415, 503)},
            }},
            "/api/v1/participant/votes": {"post": {
                "summary": "Submit one vote; exactly once per trial token",
                "security": _BEARER,
                "requestBody": _body(_ref("VoteRequest")),
                "responses": {"200": _json(_ref("VoteResponse"),
                                           "stored (or replayed: X-Idempotent-Replay: true)"),
                              **_errors(400, 401, 403, 404, 409, 410, 413, 415, 503)},
            }},
            "/api/v1/participant/display": {"post": {
                "summary": "Report the display check (card, blind spot, scaling); the "
                           "latest report counts",
                "security": _BEARER,
                "requestBody": _body(_ref("DisplayRequest")),
                "responses": {"200": _json({"type": "object", "properties": {"display": {
                    "allOf": [_ref("DisplayCheck")], "properties": {
                        "passed": {"type": "boolean"},
                        "problems": {"type": "array", "items": {
                            "type": "object", "properties": {
                                "code": {"enum": ["display_scaled", "too_few_px_per_deg"]},
                                "message": {"type": "string"}}}}}}}},
                    "recorded, with the server's verdict"),
                    **_errors(400, 401, 409, 413, 415, 422, 503)},
            }},
            "/api/v1/participant/finish": {"post": {
                "summary": "Finish as completed (completion code, redirect) or returned",
                "security": _BEARER,
                "requestBody": _body({"type": "object", "additionalProperties": False,
                                      "properties": {
                                          "status": {"enum": ["completed", "returned"]}}},
                                     required=False),
                "responses": {"200": _json({"type": "object", "properties": {
                    "participant": _ref("Participant"),
                    "completion_code": {"type": ["string", "null"]},
                    "redirect_url": {"type": ["string", "null"]}}}, "finished"),
                    **_errors(400, 401, 409, 413, 415, 503)},
            }},
            "/media/{sha256}.png": {"get": {
                "summary": "A stimulus image by content hash (ETag = hash, immutable cache)",
                "parameters": [{"name": "sha256", "in": "path", "required": True,
                                "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}],
                "responses": {"200": {"description": "the PNG"},
                              "304": {"description": "not modified"},
                              "404": {"description": "no image has this hash"}},
            }},
        },
    }
