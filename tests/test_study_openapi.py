"""The served OpenAPI document against the live app (schemathesis), on SQLite and
PostgreSQL: generated requests, valid and invalid, never get a 5xx, and every answer has a
status, content type and body the document declares; invalid data is refused with a 4xx.

Bounded and deterministic: a fixed number of examples per operation, derandomized."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode, checks

from study_app import create_app
from study_app.extensions import db
from tests.study_support import Participant, make_study, write_stimulus_set


@schemathesis.check
def allowed_is_not_refused_as_malformed(ctx, response, case):
    """What the document allows is never answered 400/415 (semantic refusals such as an
    unknown trial, 404, or a finished participant, 409, are states, not form). The rules
    JSON Schema cannot say: ``answered_at`` not before ``presented_at``,
    ``exposure_offset_ms`` not before ``exposure_onset_ms``, a sequential trial's second
    image after its first, and a choice that fits the study's task (2afc or jnd)."""
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return None
    if response.status_code in (400, 415):
        body = response.json()
        ordered = body.get("field") in ("answered_at", "exposure_offset_ms", "second_onset_ms",
                                        "second_offset_ms")
        if ordered and "before" in body.get("error", ""):
            return None
        if body.get("field") == "choice" and body.get("error", "").startswith("this is a "):
            return None
        raise AssertionError(f"{case.operation.label}: the document allows this request, "
                             f"the server refused it: {response.status_code} {body}")
    return None


CHECKS = [
    allowed_is_not_refused_as_malformed,
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]
EXAMPLES = 25  # per operation and generation mode


@pytest.fixture
def api_app(any_database_url, tmp_path):
    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": any_database_url,
                      "PARTICIPANT_RATE_LIMIT": (10**6, 60.0)})
    with app.app_context():
        db.create_all()
    app.config["TEST_SLUG"] = make_study(app, write_stimulus_set(tmp_path / "set"),
                                         votes_per_item=2, trials_per_participant=4)
    yield app
    with app.app_context():
        db.engine.dispose()


def _operations(app) -> list:
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda mode: mode.value)
def test_the_server_keeps_the_openapi_document(api_app, mode):
    """Every operation of the served document, schemathesis' positive or negative
    examples, with a real participant's token where the operation needs one."""
    slug = api_app.config["TEST_SLUG"]
    operations = _operations(api_app)
    assert {op.label for op in operations} >= {
        "POST /api/v1/participant/votes", "POST /api/v1/participant/trials/next",
        "POST /api/v1/participant/finish", "POST /api/v1/studies/{slug}/participants"}
    for operation in operations:
        if mode == GenerationMode.NEGATIVE and not _negatable(operation.definition.raw):
            continue  # nothing it takes can be invalid (no body, free-form parameters)
        _check_operation(api_app, operation, mode, slug)


def _negatable(definition: dict) -> bool:
    return "requestBody" in definition or any(
        "pattern" in parameter.get("schema", {}) for parameter in definition.get("parameters", []))


def _check_operation(app, operation, mode, slug: str) -> None:
    participant = Participant(app.test_client(), slug)
    participant.next()  # leases, so votes and finishes meet real state
    secured = bool(operation.definition.raw.get("security"))
    headers = {"Authorization": f"Bearer {participant.token}"} if secured else {}

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        if (case.path_parameters or {}).get("slug") == "x":  # also hit the real study
            case.path_parameters["slug"] = slug
        case.call_and_validate(headers=headers, checks=CHECKS)

    check()


def test_the_document_declares_what_the_server_answers_for_known_mismatches(api_app):
    """The mismatches an attacker's run found (issue #21): each now agrees both ways."""
    client = api_app.test_client()
    slug = api_app.config["TEST_SLUG"]
    document = client.get("/api/v1/openapi.json").get_json()
    paths = document["paths"]
    # finish: extra fields are refused, and the document says so
    finish = paths["/api/v1/participant/finish"]["post"]["requestBody"]["content"]
    assert finish["application/json"]["schema"]["additionalProperties"] is False
    participant = Participant(client, slug)
    extra = client.post("/api/v1/participant/finish", headers=participant.headers,
                        json={"status": "returned", "extra": 1})
    assert extra.status_code == 400
    # an empty PROLIFIC_PID is refused, and the document's pattern refuses it too
    start = document["components"]["schemas"]["StartRequest"]["properties"]["prolific_pid"]
    assert start["pattern"] == "^[A-Za-z0-9_-]{1,64}$"
    empty = client.post(f"/api/v1/studies/{slug}/participants", json={"prolific_pid": ""})
    assert empty.status_code == 400
    # votes without Authorization: 401, as documented
    bare = client.post("/api/v1/participant/votes", json={})
    assert bare.status_code == 401
    assert "401" in paths["/api/v1/participant/votes"]["post"]["responses"]
    # every participant route documents the rate limit's 429
    for path, item in paths.items():
        if path.startswith("/api/v1/") and path != "/api/v1/openapi.json":
            for operation in item.values():
                assert "429" in operation["responses"], path
