"""Display calibration on the server: the geometry (checked against the visual angles it
must produce), the study's requirements (clear errors), and the display-report API
(strict validation, nothing stored on a refusal, the server's own verdict, trials
refused until the display passes)."""

from __future__ import annotations

import math

import pytest
from sqlalchemy import select

from study_app.calibration import (
    BLIND_SPOT_DEG,
    CARD_WIDTH_MM,
    DisplayReport,
    DisplayRequirements,
    check_display,
    px_per_degree,
    px_per_mm,
    unscaled,
    viewing_distance_mm,
)
from study_app.extensions import db
from study_app.models import Participant as ParticipantRow
from study_app.studies import StudyConfigError, parse_config
from tests.study_support import Participant, make_study, write_stimulus_set

BASE = {"title": "T", "slug": "cal"}
GOOD = {"device_pixel_ratio": 1, "screen_w": 1920, "screen_h": 1080, "zoom_estimate": 1.0}


def test_geometry_gives_back_the_visual_angles_it_assumes():
    px_mm = px_per_mm(323.5)
    assert px_mm * CARD_WIDTH_MM == pytest.approx(323.5)
    for blind_spot_px in (250.0, 480.0, 900.0):
        distance = viewing_distance_mm(blind_spot_px, px_mm)
        # the dot disappeared at 13.5° from fixation, seen from `distance`
        assert math.degrees(math.atan((blind_spot_px / px_mm) / distance)) == pytest.approx(
            BLIND_SPOT_DEG
        )
        deg = px_per_degree(px_mm, distance)
        # `deg` pixels centred on the line of sight span exactly one degree
        half_mm = deg / px_mm / 2
        assert math.degrees(2 * math.atan(half_mm / distance)) == pytest.approx(1.0)
    # a 96-dpi desktop (3.78 px/mm) at 57 cm: about 37.6 px/deg (1 cm ≈ 1° at 57.3 cm)
    assert px_per_degree(96 / 25.4, 573.0) == pytest.approx(96 / 25.4 * 10.0, rel=1e-4)


@pytest.mark.parametrize(
    ("dpr", "zoom", "ok"),
    [
        (1, 1.0, True),
        (2, None, True),
        (3, 1.02, True),
        (1.25, None, False),
        (1.5, 1.0, False),
        (1, 1.1, False),
        (0.9, None, False),
        (2.0000001, 1.0, True),
    ],
)
def test_unscaled_means_an_integer_ratio_and_100_percent_zoom(dpr, zoom, ok):
    assert unscaled(dpr, zoom) is ok


def test_check_display_lists_what_to_fix():
    req = DisplayRequirements(
        mode="required", viewing_distance="required", min_px_per_deg=40, require_unscaled=True
    )
    close = check_display(DisplayReport(1.25, 1536, 864, None, 323.5, 300.0), req)
    assert [code for code, _ in close.problems] == ["display_scaled", "too_few_px_per_deg"]
    assert "zoom to 100 %" in close.problems[0][1] and "farther" in close.problems[1][1]
    far = check_display(DisplayReport(2, 1536, 864, 1.0, 323.5, 300.0 * 2), req)
    assert far.passed and far.px_per_deg == pytest.approx(2 * close.px_per_deg)


@pytest.mark.parametrize(
    ("calibration", "message"),
    [
        ({"mode": "sometimes"}, "'mode' must be one of ['off', 'optional', 'required']"),
        ({"viewing_distance": 1}, "'viewing_distance' must be one of"),
        ({"require_unscaled": "yes"}, "'require_unscaled' must be true or false"),
        ({"min_px_per_deg": 30}, "needs mode: required and viewing_distance: required"),
        (
            {"mode": "required", "viewing_distance": "required", "min_px_per_deg": -2},
            "'min_px_per_deg' must be a number",
        ),
        ({"fullscreen": True}, "unknown calibration setting(s) ['fullscreen']"),
        ("on", "'calibration' must be a mapping"),
    ],
)
def test_bad_requirements_are_refused_with_the_setting_named(calibration, message):
    with pytest.raises(StudyConfigError) as error:
        parse_config({**BASE, "calibration": calibration})
    assert message in str(error.value)


def test_requirements_round_trip_through_the_stored_config():
    config = parse_config({**BASE, "calibration": {"mode": "required", "require_fullscreen": True}})
    again = parse_config(config.to_dict())
    assert again == config and again.calibration.require_fullscreen
    assert parse_config(BASE).calibration == DisplayRequirements()  # old configs: off


@pytest.fixture
def strict(app, tmp_path):
    return make_study(
        app,
        write_stimulus_set(tmp_path / "set"),
        slug="strict",
        calibration={
            "mode": "required",
            "viewing_distance": "required",
            "min_px_per_deg": 25,
            "require_unscaled": True,
        },
    )


def _row(app, token: str) -> dict:
    with app.app_context():
        row = db.session.scalars(select(ParticipantRow).where(ParticipantRow.token == token)).one()
        return {
            c: getattr(row, c)
            for c in (
                "display_status",
                "display_attempts",
                "display_dpr",
                "display_screen_w",
                "display_zoom",
                "display_scaling_ok",
                "card_width_px",
                "px_per_mm",
                "blind_spot_px",
                "viewing_distance_mm",
                "px_per_deg",
            )
        }


def _report(person: Participant, body):
    return person.client.post("/api/v1/participant/display", headers=person.headers, json=body)


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({**GOOD}, 422, "calibration_mismatch", "card_width_px"),
        ({**GOOD, "card_width_px": 323.5}, 422, "calibration_mismatch", "blind_spot_px"),
        (
            {
                "device_pixel_ratio": 1,
                "screen_w": 1920,
                "card_width_px": 323.5,
                "blind_spot_px": 400,
            },
            400,
            "missing_field",
            "screen_h",
        ),
        ({**GOOD, "blind_spot_px": 400}, 400, "missing_field", "card_width_px"),
        (
            {**GOOD, "card_width_px": 323.5, "blind_spot_px": 400, "pixels": 3},
            400,
            "unknown_field",
            "pixels",
        ),
        (
            {**GOOD, "card_width_px": "323", "blind_spot_px": 400},
            400,
            "invalid_field",
            "card_width_px",
        ),
        (
            {**GOOD, "card_width_px": 1e9, "blind_spot_px": 400},
            400,
            "invalid_field",
            "card_width_px",
        ),
        (
            {**GOOD, "device_pixel_ratio": 0, "card_width_px": 323.5, "blind_spot_px": 400},
            400,
            "invalid_field",
            "device_pixel_ratio",
        ),
        (
            {**GOOD, "screen_w": 1.5, "card_width_px": 323.5, "blind_spot_px": 400},
            400,
            "invalid_field",
            "screen_w",
        ),
        (
            {**GOOD, "zoom_estimate": 9, "card_width_px": 323.5, "blind_spot_px": 400},
            400,
            "invalid_field",
            "zoom_estimate",
        ),
        # 30 px at 3.78 px/mm: a viewing distance of 3.3 cm
        (
            {**GOOD, "card_width_px": 323.5, "blind_spot_px": 30},
            422,
            "implausible_distance",
            "blind_spot_px",
        ),
    ],
)
def test_nonsense_display_reports_are_refused_and_change_nothing(
    app, client, strict, body, status, code, field
):
    person = Participant(client, strict)
    before = _row(app, person.token)
    response = _report(person, body)
    assert response.status_code == status, response.get_json()
    answer = response.get_json()
    assert answer["code"] == code and answer["field"] == field and answer["error"]
    assert _row(app, person.token) == before


def test_malformed_and_unauthenticated_reports(app, client, strict):
    person = Participant(client, strict)
    assert client.post("/api/v1/participant/display", json=GOOD).status_code == 401
    response = client.post(
        "/api/v1/participant/display",
        headers=person.headers,
        data='{"device_pixel_ratio": NaN}',
        content_type="application/json",
    )
    assert response.status_code == 400 and response.get_json()["code"] == "malformed_json"
    assert _row(app, person.token)["display_attempts"] == 0


def test_the_server_judges_the_display_and_gates_the_trials(app, client, strict):
    person = Participant(client, strict)
    assert person.start_response.get_json()["participant"]["display"]["status"] is None
    refused = person.next()
    assert refused.status_code == 409 and refused.get_json()["code"] == "display_check_needed"
    # a zoomed page, too close: recorded as failed, with both problems to fix
    scaled = _report(
        person,
        {
            **GOOD,
            "device_pixel_ratio": 1.25,
            "zoom_estimate": None,
            "card_width_px": 323.5,
            "blind_spot_px": 250,
        },
    )
    assert scaled.status_code == 200
    verdict = scaled.get_json()["display"]
    assert verdict["passed"] is False and verdict["status"] == "failed"
    assert [p["code"] for p in verdict["problems"]] == ["display_scaled", "too_few_px_per_deg"]
    assert person.next().status_code == 409
    # fixed: 100 % zoom, farther away
    fixed = _report(person, {**GOOD, "card_width_px": 323.5, "blind_spot_px": 400})
    verdict = fixed.get_json()["display"]
    assert verdict["passed"] and verdict["problems"] == [] and verdict["attempts"] == 2
    px_mm = 323.5 / 85.6
    distance = 400 / px_mm / math.tan(math.radians(13.5))
    assert verdict["px_per_mm"] == pytest.approx(px_mm)
    assert verdict["viewing_distance_mm"] == pytest.approx(distance)
    assert verdict["px_per_deg"] == pytest.approx(
        2 * distance * math.tan(math.radians(0.5)) * px_mm
    )
    stored = _row(app, person.token)
    assert stored["display_status"] == "passed" and stored["display_dpr"] == 1.0
    assert stored["display_scaling_ok"] is True and stored["card_width_px"] == 323.5
    assert stored["px_per_deg"] == pytest.approx(verdict["px_per_deg"])
    assert person.next().status_code == 200  # the trials are open now
    resumed = client.post("/api/v1/participant", headers=person.headers)  # GET only
    assert resumed.status_code == 405
    me = client.get("/api/v1/participant", headers=person.headers).get_json()
    assert me["participant"]["display"]["status"] == "passed"
    person.complete()
    assert person.finish().status_code == 200
    late = _report(person, {**GOOD, "card_width_px": 323.5, "blind_spot_px": 400})
    assert late.status_code == 409 and late.get_json()["code"] == "participant_finished"


def test_optional_calibration_may_be_skipped_and_off_refuses_a_card(app, client, tmp_path):
    root = write_stimulus_set(tmp_path / "set")
    optional = make_study(app, root, slug="opt", calibration={"mode": "optional"})
    person = Participant(client, optional)
    assert person.next().status_code == 200  # nothing required: no gate
    skipped = _report(person, GOOD)
    assert skipped.status_code == 200 and skipped.get_json()["display"]["px_per_mm"] is None
    card_only = _report(person, {**GOOD, "card_width_px": 400})  # distance is optional
    assert card_only.get_json()["display"]["px_per_mm"] == pytest.approx(400 / 85.6)
    unscaled_only = make_study(app, root, slug="unscaled", calibration={"require_unscaled": True})
    other = Participant(client, unscaled_only)
    card = _report(other, {**GOOD, "card_width_px": 400})
    assert card.status_code == 422 and card.get_json()["field"] == "card_width_px"
    assert "card calibration is off" in card.get_json()["error"]
    assert _report(other, {**GOOD, "device_pixel_ratio": 2}).get_json()["display"]["passed"]
    assert other.next().status_code == 200


def test_pstudy_study_create_takes_the_calibration_options(tmp_path):
    from click.testing import CliRunner

    from study_app import create_app
    from study_app.commands import study
    from study_app.studies import find_study

    url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    root = write_stimulus_set(tmp_path / "set", manifest=False)
    config = tmp_path / "study.yaml"
    config.write_text("title: Crisp\ncalibration:\n  mode: optional\n  require_fullscreen: true\n")
    runner = CliRunner()
    created = runner.invoke(
        study,
        [
            "create",
            str(root),
            "--config",
            str(config),
            "--calibration",
            "required",
            "--viewing-distance",
            "required",
            "--min-px-per-deg",
            "30",
            "--require-unscaled",
            "--database-url",
            url,
        ],
    )
    assert created.exit_code == 0, created.output
    bad = runner.invoke(
        study,
        ["create", str(root), "--slug", "bad", "--min-px-per-deg", "30", "--database-url", url],
    )
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    assert "'min_px_per_deg' needs mode: required and viewing_distance: required" in bad.output
    app = create_app({"SQLALCHEMY_DATABASE_URI": url})
    with app.app_context():
        stored = find_study("crisp").config["calibration"]
        db.engine.dispose()
    # the options win setting by setting; the file's fullscreen stays
    assert stored == {
        "mode": "required",
        "viewing_distance": "required",
        "min_px_per_deg": 30.0,
        "require_unscaled": True,
        "require_fullscreen": True,
    }


def _attentive():
    """Picks the reference on catch trials, alternates otherwise (no exclusion)."""
    turns = iter(range(1000))

    def choose(trial):
        if trial["reference_url"] in (trial["left_url"], trial["right_url"]):
            return "left" if trial["left_url"] == trial["reference_url"] else "right"
        return ("left", "right")[next(turns) % 2]

    return choose


def test_export_dashboard_and_report_carry_the_calibration(app, client, tmp_path):
    """Four participants of an optional-calibration study: card + blind spot, card only,
    skipped on a scaled page, never reported. The export repeats each one's display
    check on their rows (CSV and Parquet), the dashboard counts the coverage, and the
    analysis report summarises it (statistics against Python's own)."""
    import io
    import statistics

    import pandas as pd
    import pyarrow.parquet as pq

    from analysis.display import display_calibration_table, value_summary
    from analysis.io import load_responses
    from analysis.qc import QCOptions
    from analysis.report import AnalysisOptions, render_html, run_analysis
    from study_app import export
    from tests.study_support import log_in_as_researcher

    slug = make_study(
        app,
        write_stimulus_set(tmp_path / "set"),
        slug="covered",
        votes_per_item=4,
        trials_per_participant=4,
        calibration={"mode": "optional"},
    )
    reports = [
        {**GOOD, "card_width_px": 404.0, "blind_spot_px": 305.4},
        {**GOOD, "card_width_px": 380.0},
        {**GOOD, "device_pixel_ratio": 1.25, "zoom_estimate": None},
        None,
    ]
    people = []
    for report in reports:
        person = Participant(client, slug)
        if report is not None:
            assert _report(person, report).status_code == 200
        person.complete(_attentive())
        assert person.finish().status_code == 200
        people.append(person)

    with app.app_context(), db.engine.connect() as connection:
        buffer = io.StringIO()
        export.write_csv(connection, slug, buffer)
        export.write_parquet(connection, slug, tmp_path / "r.parquet")
    (tmp_path / "r.csv").write_text(buffer.getvalue())
    csv_frame = pd.read_csv(io.StringIO(buffer.getvalue()), keep_default_na=False)
    parquet = pq.read_table(tmp_path / "r.parquet").to_pandas()
    ids = [_row_id(app, person.token) for person in people]
    first = csv_frame.groupby("participant").first()
    px_mm = 404.0 / 85.6
    distance = 305.4 / px_mm / math.tan(math.radians(13.5))
    deg = 2 * distance * math.tan(math.radians(0.5)) * px_mm
    assert first.loc[ids[0], "display_status"] == "passed"
    assert float(first.loc[ids[0], "display_px_per_mm"]) == pytest.approx(px_mm)
    assert float(first.loc[ids[0], "display_px_per_deg"]) == pytest.approx(deg)
    assert float(first.loc[ids[0], "display_viewing_distance_mm"]) == pytest.approx(distance)
    assert first.loc[ids[1], "display_px_per_deg"] == ""  # no blind spot
    assert (first.loc[ids[2], ["display_dpr", "display_unscaled"]] == ["1.25", "false"]).all()
    assert (
        first.loc[ids[3], ["display_status", "display_px_per_mm", "display_unscaled"]] == ""
    ).all()
    assert (csv_frame.groupby("participant")["display_px_per_mm"].nunique() == 1).all()
    pq_first = parquet.groupby("participant").first()
    assert pq_first.loc[ids[0], "display_px_per_mm"] == pytest.approx(px_mm)
    assert pq_first.loc[ids[0], "display_unscaled"] is True  # noqa: E712 (a real bool)
    assert parquet.loc[parquet["participant"] == ids[3], "display_unscaled"].isna().all()

    log_in_as_researcher(app, client)
    data = client.get(f"/researcher/studies/{slug}/dashboard.json").get_json()["display"]
    assert (data["participants"], data["checked"], data["calibrated"], data["passed"]) == (
        4,
        3,
        2,
        3,
    )
    assert data["share"] == pytest.approx(0.5)
    assert data["px_per_deg"]["n"] == 1 and data["px_per_deg"]["median"] == pytest.approx(deg)
    page = client.get(f"/researcher/studies/{slug}").get_data(as_text=True)
    assert "Display calibration: 2 of 4 participants calibrated (50.0 %)" in page

    loaded = load_responses(tmp_path / "r.csv")
    table = display_calibration_table(loaded.frame).set_index("quantity")
    card = table.loc["card calibration"]
    values = [px_mm, 380.0 / 85.6]
    assert (card["participants"], card["share"]) == (2, 0.5)
    assert card["median"] == pytest.approx(statistics.median(values))
    q25, _, q75 = statistics.quantiles(values, n=4, method="inclusive")
    assert (card["q25"], card["q75"]) == pytest.approx((q25, q75))
    assert table.loc["devicePixelRatio", "max"] == 1.25
    assert table.iloc[-1]["participants"] == 2  # unscaled: the two at ratio 1 with a check
    sample = [3.1, 7.4, 2.2, 9.9, 5.0, 4.4]
    assert value_summary(sample) == pytest.approx(
        {
            "n": 6,
            "median": statistics.median(sample),
            "min": 2.2,
            "max": 9.9,
            **dict(
                zip(
                    ("q25", "q75"),
                    statistics.quantiles(sample, n=4, method="inclusive")[::2],
                    strict=True,
                )
            ),
        }
    )
    no_rules = QCOptions(min_catch_accuracy=None, max_side_rate=None, max_fast_fraction=None)
    result = run_analysis(loaded, AnalysisOptions(n_boot=20, mixed=False, qc=no_rules))
    html = render_html(result, {})
    assert "Display calibration of the 4 participants" in html
    assert "display_calibration.csv" in html


def _row_id(app, token: str) -> str:
    with app.app_context():
        return db.session.scalars(
            select(ParticipantRow.public_id).where(ParticipantRow.token == token)
        ).one()


def test_synthetic_participants_report_their_display(app, live_server, tmp_path):
    """`pstudy simulate` on a study that checks the display: each synthetic participant
    reports the 96-dpi display seen from 60 cm that its votes describe (39.6 px/deg);
    a study asking for more is refused with the server's reason."""
    from study_app.simulate import run_simulation

    root = write_stimulus_set(tmp_path / "set")
    required = {"mode": "required", "viewing_distance": "required", "require_unscaled": True}
    ok = make_study(app, root, slug="sim-ok", calibration={**required, "min_px_per_deg": 30})
    result = run_simulation(live_server, ok, participants=2, concurrency=2, progress=False)
    assert result.errors == [] and result.completed == 2
    with app.app_context():
        rows = db.session.scalars(select(ParticipantRow)).all()
        assert [row.display_status for row in rows] == ["passed", "passed"]
        expected = 2 * 600 * math.tan(math.radians(0.5)) * 96 / 25.4
        assert [row.px_per_deg for row in rows] == pytest.approx([expected] * 2)
    sharp = make_study(app, root, slug="sim-sharp", calibration={**required, "min_px_per_deg": 50})
    refused = run_simulation(live_server, sharp, participants=1, progress=False)
    assert refused.completed == 0 and "too_few_px_per_deg" in refused.errors[0]
