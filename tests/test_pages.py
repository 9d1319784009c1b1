"""Participant and researcher pages through Flask's test client (no browser): login,
study creation by form, status changes, preview, dashboard numbers and downloads."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter

import pandas as pd
import pytest
from sqlalchemy import func, select

from tests.test_pages_support import (
    EMAIL,
    PASSWORD,
    csrf_token,
    import_set,
    login,
    make_researcher,
    make_study,
    write_stimulus_set,
)


@pytest.fixture
def researcher(app):
    return make_researcher(app)


@pytest.fixture
def set_id(app, tmp_path, researcher):
    return import_set(app, write_stimulus_set(tmp_path / "set"), owner=researcher)


def vote_through_api(client, slug: str, choose) -> int:
    """One participant answers every trial via the JSON API (``choose(trial) -> side``)."""
    started = client.post(f"/api/v1/studies/{slug}/participants", json={})
    assert started.status_code == 201, started.get_json()
    headers = {"Authorization": "Bearer " + started.get_json()["participant"]["token"]}
    answered = 0
    while True:
        batch = client.post("/api/v1/participant/trials/next", json={}, headers=headers)
        trials = batch.get_json()["trials"]
        if not trials:
            assert batch.get_json()["done"]
            break
        for trial in trials:
            body = {
                "trial_token": trial["token"],
                "choice": choose(trial),
                "rt_ms": 812.5,
                "presented_at": "2026-01-01T10:00:00.000Z",
                "answered_at": "2026-01-01T10:00:00.812Z",
                "viewport_w": 1280,
                "viewport_h": 800,
                "device_pixel_ratio": 1.0,
            }
            assert (
                client.post("/api/v1/participant/votes", json=body, headers=headers).status_code
                == 200
            )
            answered += 1
    assert (
        client.post(
            "/api/v1/participant/finish", json={"status": "completed"}, headers=headers
        ).status_code
        == 200
    )
    return answered


# --------------------------------------------------------------------------- participant


def test_participant_page_serves_the_runner_for_live_studies_only(app, client, set_id):
    make_study(app, set_id, slug="live-one")
    make_study(app, set_id, slug="draft-one", status="draft")
    page = client.get("/s/live-one?PROLIFIC_PID=abc")
    html = page.get_data(as_text=True)
    assert page.status_code == 200
    assert 'data-study="live-one"' in html and 'data-api="/api/v1"' in html
    assert 'data-preview="false"' in html
    for script in ("js/trial-core.js", "js/participant.js"):
        assert f'src="/static/{script}"' in html
        assert client.get(f"/static/{script}").status_code == 200
    for slug in ("draft-one", "no-such-study"):
        missing = client.get(f"/s/{slug}")
        assert missing.status_code == 404
        assert "There is no study at this address" in missing.get_data(as_text=True)


# --------------------------------------------------------------------------- login


def test_login_with_a_wrong_password_fails_and_the_right_one_opens_the_studies(
    app, client, researcher
):
    wrong = login(client, password="not it")
    assert wrong.status_code == 401 and "Wrong e-mail or password" in wrong.get_data(True)
    assert client.get("/researcher/").status_code == 302
    unknown = login(client, email="nobody@example.org")
    assert unknown.status_code == 401
    ok = login(client)
    assert ok.status_code == 302 and ok.headers["Location"] == "/researcher/"
    cookie = ok.headers["Set-Cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert client.get("/researcher/").status_code == 200
    page = client.get("/researcher/").get_data(as_text=True)
    logout = client.post("/logout", data={"csrf_token": csrf_token(page)})
    assert logout.status_code == 302
    assert client.get("/researcher/").status_code == 302


def session_cookie(client) -> str:
    return client.get_cookie("session").value


def logins(app) -> list[tuple[str, bool]]:
    """(token digest, still open) of every stored login, oldest first."""
    from study_app.extensions import db
    from study_app.models import ResearcherLogin

    with app.app_context():
        rows = db.session.scalars(select(ResearcherLogin).order_by(ResearcherLogin.id))
        return [(row.token_sha256, row.ended_at is None) for row in rows]


def test_logout_ends_the_login_on_the_server_so_an_old_cookie_stays_logged_out(
    app, client, set_id, researcher
):
    """A dashboard poll answered after the logout re-sends the session cookie it started
    with (Flask refreshes permanent sessions on every response); a copied cookie is the
    same thing. Neither may log the researcher back in."""
    make_study(app, set_id, slug="watched", owner=researcher)
    login(client)
    page = client.get("/researcher/").get_data(as_text=True)
    poll = client.get("/researcher/studies/watched/dashboard.json")
    assert poll.status_code == 200 and "Set-Cookie" in poll.headers  # refreshed each time
    old_cookie = session_cookie(client)
    assert [open_ for _, open_ in logins(app)] == [True]
    assert client.post("/logout", data={"csrf_token": csrf_token(page)}).status_code == 302
    assert [open_ for _, open_ in logins(app)] == [False]
    client.set_cookie("session", old_cookie)  # the late poll's Set-Cookie
    again = client.get("/researcher/studies/watched/dashboard.json",
                       headers={"Accept": "application/json"})
    assert again.status_code == 401 and "log in" in again.get_json()["error"]
    assert client.get("/researcher/").status_code == 302
    assert client.get("/researcher/studies/watched/responses.csv").status_code == 302
    preview = client.post("/api/v1/studies/watched/participants", json={"preview": True})
    assert preview.status_code == 403


def test_each_login_is_its_own_and_ended_logins_are_cleaned_up(app, researcher):
    first, second = app.test_client(), app.test_client()
    login(first)
    login(second)
    assert [open_ for _, open_ in logins(app)] == [True, True]
    page = first.get("/researcher/").get_data(as_text=True)
    first.post("/logout", data={"csrf_token": csrf_token(page)})
    assert first.get("/researcher/").status_code == 302
    assert second.get("/researcher/").status_code == 200  # the other browser stays in
    stored = logins(app)
    assert [open_ for _, open_ in stored] == [False, True]
    assert all(digest not in session_cookie(second) for digest, _ in stored)  # hashed
    login(first)  # a new login deletes the researcher's ended ones
    assert [open_ for _, open_ in logins(app)] == [True, True]
    assert stored[0][0] not in [digest for digest, _ in logins(app)]


def test_a_login_expires_after_the_session_lifetime_although_the_cookie_is_refreshed(
    app, client, researcher
):
    from datetime import timedelta

    from study_app.extensions import db
    from study_app.models import ResearcherLogin, utcnow

    login(client)
    assert client.get("/researcher/").status_code == 200
    lifetime = app.permanent_session_lifetime
    with app.app_context():
        row = db.session.scalars(select(ResearcherLogin)).one()
        row.created_at = utcnow() - lifetime + timedelta(seconds=30)
        db.session.commit()
    assert client.get("/researcher/").status_code == 200
    with app.app_context():
        row = db.session.scalars(select(ResearcherLogin)).one()
        row.created_at = utcnow() - lifetime - timedelta(seconds=1)
        db.session.commit()
    assert client.get("/researcher/").status_code == 302


def test_researcher_accounts_from_the_command_line_and_a_new_password_ends_logins(
    app, client
):
    from click.testing import CliRunner

    from study_app.cli import main

    url = ["--database-url", app.config["SQLALCHEMY_DATABASE_URI"]]
    runner = CliRunner()
    made = runner.invoke(main, ["researcher", "create", EMAIL, "--password", PASSWORD, *url])
    assert made.exit_code == 0 and f"created researcher {EMAIL}" in made.output
    twice = runner.invoke(main, ["researcher", "create", EMAIL, "--password", PASSWORD, *url])
    assert twice.exit_code == 1 and "exists already" in twice.output
    login(client)
    other = app.test_client()
    login(other)
    assert client.get("/researcher/").status_code == 200

    short = runner.invoke(main, ["researcher", "set-password", EMAIL, "--password", "short", *url])
    assert short.exit_code == 2 and "at least 8 characters" in short.output
    unknown = runner.invoke(
        main, ["researcher", "set-password", "nobody@example.org", "--password", "x" * 12, *url]
    )
    assert unknown.exit_code == 1 and "pstudy researcher create" in unknown.output
    assert "Traceback" not in short.output + unknown.output
    assert client.get("/researcher/").status_code == 200  # refused commands changed nothing

    changed = runner.invoke(
        main, ["researcher", "set-password", EMAIL.upper(), "--password", "a new passphrase", *url]
    )
    assert changed.exit_code == 0 and "ended 2 open login(s)" in changed.output
    assert client.get("/researcher/").status_code == 302
    assert other.get("/researcher/").status_code == 302
    assert login(client).status_code == 401  # the old password
    assert login(client, password="a new passphrase").status_code == 302
    assert client.get("/researcher/").status_code == 200


def test_login_follows_only_local_next_targets(app, client, researcher):
    for target, expected in (
        ("/researcher/studies/new", "/researcher/studies/new"),
        ("//evil.example/x", "/researcher/"),
        ("https://evil.example/", "/researcher/"),
    ):
        page = client.get("/login")
        response = client.post(
            f"/login?next={target}",
            data={
                "email": "Researcher@Example.org",
                "password": "correct horse battery staple",
                "csrf_token": csrf_token(page.get_data(as_text=True)),
            },
        )
        assert response.headers["Location"] == expected


# --------------------------------------------------------------------------- studies


def study_form(page_html: str, **overrides) -> dict:
    data = {
        "csrf_token": csrf_token(page_html),
        "title": "Loss comparison",
        "slug": "loss-cmp",
        "question_mode": "reference",
        "votes_per_item": "3",
        "trials_per_participant": "5",
        "catch_trials": "1",
        "repeat_trials": "1",
        "practice_trials": "2",
        "display_scale": "auto",
        "pixelated": "y",
        "completion_code": "ABC123",
        "completion_url": "https://app.prolific.com/submissions/complete?cc=ABC123",
        "min_catch_accuracy": "0.75",
        "min_rt_ms": "200",
        "max_side_bias": "0.9",
        "seed": "7",
        "language": "en",
        "conditions": ["blurred", "sharp"],
    }
    data.update(overrides)
    return data


def test_a_study_is_created_by_form_then_started_paused_and_closed(app, client, set_id, researcher):
    from study_app.extensions import db
    from study_app.models import Item, Study

    login(client)
    form_page = client.get(f"/researcher/studies/new?set={set_id}").get_data(as_text=True)
    assert 'value="blurred"' in form_page and 'value="noisy"' in form_page
    created = client.post(f"/researcher/studies/new?set={set_id}",
                          data=study_form(form_page, language="de", break_every="2"))
    assert created.status_code == 303
    assert created.headers["Location"] == "/researcher/studies/loss-cmp"
    with app.app_context():
        study = db.session.scalars(select(Study).where(Study.slug == "loss-cmp")).one()
        assert study.status == "draft" and study.created_by_id == researcher
        assert study.config["conditions"] == ["blurred", "sharp"]
        assert study.config["votes_per_item"] == 3 and study.config["seed"] == 7
        assert study.config["exclusion"]["min_rt_ms"] == 200.0
        n_items = db.session.scalar(select(func.count()).where(Item.study_id == study.id))
        assert n_items == 4  # 4 images × 1 pair
        assert study.config["language"] == "de" and study.config["break_every"] == 2
    dashboard = client.get("/researcher/studies/loss-cmp").get_data(as_text=True)
    # M = 5 main trials but only 4 items: said on the first page after creation
    assert "Check the design: M = 5 main trials per participant, but the design has only 4" \
        in dashboard
    assert client.get("/s/loss-cmp").status_code == 404  # a draft is not public yet

    def act(action):
        page = client.get("/researcher/studies/loss-cmp").get_data(as_text=True)
        return client.post(
            f"/researcher/studies/loss-cmp/status/{action}", data={"csrf_token": csrf_token(page)}
        )

    assert 'id="action-start"' in dashboard
    for action, status in (
        ("start", "live"),
        ("pause", "paused"),
        ("resume", "live"),
        ("close", "closed"),
    ):
        assert act(action).status_code == 303
        with app.app_context():
            assert (
                db.session.scalars(select(Study.status).where(Study.slug == "loss-cmp")).one()
                == status
            )
    refused = act("start")  # closed stays closed: a message, no change
    assert refused.status_code == 303
    assert "cannot become live" in client.get("/researcher/studies/loss-cmp").get_data(True)


def test_an_active_study_is_created_by_form_and_its_dashboard_shows_the_precision(
    app, client, set_id, researcher
):
    from study_app.extensions import db
    from study_app.models import Study, StudyPosterior

    login(client)
    form_page = client.get(f"/researcher/studies/new?set={set_id}").get_data(as_text=True)
    assert 'value="active"' in form_page
    created = client.post(f"/researcher/studies/new?set={set_id}", data=study_form(
        form_page, design="active", stop_half_width="0.25", vote_budget="400"))
    assert created.status_code == 303
    with app.app_context():
        study = db.session.scalars(select(Study).where(Study.slug == "loss-cmp")).one()
        assert study.config["design"] == "active" and study.config["stop_half_width"] == 0.25
        assert study.config["vote_budget"] == 400
        assert db.session.get(StudyPosterior, study.id).n_votes == 0
    dashboard = client.get("/researcher/studies/loss-cmp").get_data(as_text=True)
    assert 'id="active-design"' in dashboard and "95 % half-width ≤ 0.25 JOD" in dashboard
    assert "vote budget 400" in dashboard and dashboard.count("<td>blurred</td>") == 1


def test_a_study_with_display_requirements_is_created_by_form(app, client, set_id, researcher):
    from study_app.extensions import db
    from study_app.models import Study

    login(client)
    form_page = client.get(f"/researcher/studies/new?set={set_id}").get_data(as_text=True)
    assert 'id="calibration_mode"' in form_page and 'id="require_fullscreen"' in form_page
    created = client.post(f"/researcher/studies/new?set={set_id}", data=study_form(
        form_page, calibration_mode="required", viewing_distance="required",
        min_px_per_deg="32.5", require_unscaled="y", require_fullscreen="y"))
    assert created.status_code == 303, created.get_data(as_text=True)[-2000:]
    with app.app_context():
        study = db.session.scalars(select(Study).where(Study.slug == "loss-cmp")).one()
        assert study.config["calibration"] == {
            "mode": "required", "viewing_distance": "required", "min_px_per_deg": 32.5,
            "require_unscaled": True, "require_fullscreen": True}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"slug": "Bad Slug"}, "slug 'Bad Slug' must be 2-80 lowercase letters"),
        ({"conditions": ["blurred"]}, "choose at least two conditions"),
        ({"display_scale": "huge"}, "'display_scale' must be 'auto' or an integer"),
        ({"completion_url": "ftp://x"}, "'completion_url' must be an http(s) URL"),
        ({"min_catch_accuracy": "lots"}, "'min_catch_accuracy' must be a number"),
        ({"votes_per_item": "0"}, "Votes per item (K)"),
        ({"stop_half_width": "0.2"}, "need design: active"),
        ({"design": "active", "stop_half_width": "tight"}, "'stop_half_width' must be a number"),
        ({"min_px_per_deg": "30"}, "'min_px_per_deg' needs mode: required and viewing_distance"),
        ({"calibration_mode": "required", "viewing_distance": "required",
          "min_px_per_deg": "sharp"}, "'min_px_per_deg' must be a number"),
        ({"calibration_mode": "always"}, "Not a valid choice"),
    ],
)
def test_a_bad_study_form_is_refused_with_the_reason_and_creates_nothing(
    app, client, set_id, researcher, overrides, message
):
    from study_app.extensions import db
    from study_app.models import Study

    login(client)
    form_page = client.get(f"/researcher/studies/new?set={set_id}").get_data(as_text=True)
    response = client.post(
        f"/researcher/studies/new?set={set_id}", data=study_form(form_page, **overrides)
    )
    assert response.status_code == 400
    assert message in response.get_data(as_text=True).replace("&#39;", "'")
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(Study)) == 0


def test_a_stimulus_folder_is_imported_through_the_form(app, client, researcher, tmp_path):
    from study_app.extensions import db
    from study_app.models import StimulusSet

    app.config["STIMULUS_ROOTS"] = [str(tmp_path)]
    login(client)
    page = client.get("/researcher/").get_data(as_text=True)
    bad = client.post(
        "/researcher/stimulus-sets",
        data={"csrf_token": csrf_token(page), "path": str(tmp_path / "missing")},
    )
    assert bad.status_code == 303
    assert "Could not import" in client.get("/researcher/").get_data(as_text=True)
    root = write_stimulus_set(tmp_path / "fresh")
    good = client.post(
        "/researcher/stimulus-sets", data={"csrf_token": csrf_token(page), "path": str(root)}
    )
    with app.app_context():
        stimulus_set = db.session.scalars(select(StimulusSet)).one()
        assert [c.name for c in stimulus_set.conditions] == ["blurred", "noisy", "sharp"]
    assert good.headers["Location"] == f"/researcher/studies/new?set={stimulus_set.id}"


def test_preview_runs_the_study_as_a_participant_without_counting(app, client, set_id, researcher):
    make_study(app, set_id, slug="prev", status="draft", owner=researcher)
    assert (
        client.post("/api/v1/studies/prev/participants", json={"preview": True}).status_code == 403
    )
    login(client)
    page = client.get("/researcher/studies/prev/preview").get_data(as_text=True)
    assert 'data-preview="true"' in page and 'data-study="prev"' in page
    started = client.post("/api/v1/studies/prev/participants", json={"preview": True})
    assert started.status_code == 201 and started.get_json()["participant"]["preview"]
    data = client.get("/researcher/studies/prev/dashboard.json").get_json()
    assert data["participants"] == {"started": 0, "completed": 0, "returned": 0}


# --------------------------------------------------------------------------- dashboard


def test_dashboard_numbers_match_the_stored_votes(app, client, set_id, researcher):
    import numpy as np

    from analysis.report import pair_table
    from study_app.export import read_responses
    from study_app.extensions import db
    from study_app.models import Item, Vote

    study = make_study(app, set_id, slug="dash", trials_per_participant=6, owner=researcher)
    login(client)
    empty = client.get("/researcher/studies/dash/dashboard.json").get_json()
    assert empty["responses"] == 0 and empty["preference"] == []
    assert empty["items"]["votes"] == 0 and empty["items"]["items"] == 12
    assert empty["items"]["histogram"][0] == {"votes": 0, "items": 12}

    answered = [
        vote_through_api(client, "dash", lambda t, i=i: ("left", "right")[i % 2]) for i in range(3)
    ]
    data = client.get("/researcher/studies/dash/dashboard.json").get_json()
    assert data["participants"] == {"started": 0, "completed": 3, "returned": 0}
    assert data["responses"] == sum(answered) == 3 * 8

    with app.app_context():
        votes = db.session.scalars(select(Vote).where(Vote.study_id == study["id"])).all()
        main_votes = [v for v in votes if v.trial.kind == "main"]
        item_votes = Counter(v.trial.item_id for v in main_votes)
        n_items = db.session.scalar(select(func.count()).where(Item.study_id == study["id"]))
        # Independent count of wins per unordered pair straight from the vote rows.
        wins = Counter()
        totals = Counter()
        for v in main_votes:
            a, b = sorted((v.trial.condition_left, v.trial.condition_right))
            totals[(a, b)] += 1
            wins[(a, b)] += v.chosen_condition == a
    assert data["items"]["votes"] == len(main_votes)
    assert data["items"]["items_complete"] == sum(1 for n in item_votes.values() if n >= 2)
    histogram = Counter(min(n, 2) for n in item_votes.values())
    histogram[0] += n_items - len(item_votes)
    assert [h["items"] for h in data["items"]["histogram"]] == [
        histogram[0],
        histogram[1],
        histogram[2],
    ]
    excluded = data["exclusions"]["excluded"]
    responses = read_responses(app.config["SQLALCHEMY_DATABASE_URI"], "dash")
    included = responses[~responses["participant_excluded"]]
    expected = pair_table(included)
    assert len(data["preference"]) == len(expected)
    for row, (_, ref) in zip(data["preference"], expected.iterrows(), strict=True):
        assert (row["condition_a"], row["condition_b"]) == (ref.condition_a, ref.condition_b)
        assert row["n"] == ref.n and row["wins_a"] == ref.wins_a
        for column in ("ci_low", "ci_high", "p_holm"):  # the report's two-way numbers
            value = getattr(ref, column)
            assert (row[column] is None) if np.isnan(value) else row[column] == pytest.approx(value)
    if excluded == 0:
        assert {
            (r["condition_a"], r["condition_b"]): (r["n"], r["wins_a"]) for r in data["preference"]
        } == {k: (totals[k], wins[k]) for k in totals}
    html = client.get("/researcher/studies/dash").get_data(as_text=True)
    assert '<div class="value" id="n-completed">3</div>' in html
    plot = client.get("/researcher/studies/dash/preference.png")
    assert plot.status_code == 200 and plot.data[:8] == b"\x89PNG\r\n\x1a\n"


def test_downloads_give_the_export_config_and_manifest(app, client, set_id, researcher, tmp_path):
    from study_app.export import COLUMNS, read_responses
    from study_app.stimuli import canonical_json_sha256

    make_study(app, set_id, slug="dl", owner=researcher)
    login(client)
    vote_through_api(client, "dl", lambda trial: "left")
    reference = read_responses(app.config["SQLALCHEMY_DATABASE_URI"], "dl")
    assert len(reference) == 6

    csv = client.get("/researcher/studies/dl/responses.csv")
    assert csv.status_code == 200 and csv.mimetype == "text/csv"
    assert 'filename="dl-responses.csv"' in csv.headers["Content-Disposition"]
    from_csv = pd.read_csv(io.BytesIO(csv.data), keep_default_na=False)
    assert list(from_csv.columns) == list(COLUMNS)
    assert from_csv["participant"].tolist() == reference["participant"].tolist()
    assert from_csv["chosen_condition"].tolist() == reference["chosen_condition"].tolist()
    assert from_csv["rt_ms"].tolist() == reference["rt_ms"].tolist()

    parquet = client.get("/researcher/studies/dl/responses.parquet")
    assert parquet.status_code == 200
    from_parquet = pd.read_parquet(io.BytesIO(parquet.data))
    pd.testing.assert_frame_equal(from_parquet.reset_index(drop=True), reference, check_dtype=False)

    config = json.loads(client.get("/researcher/studies/dl/config.json").data)
    assert config["config_sha256"] == canonical_json_sha256(config["config"])
    assert config["config"]["slug"] == "dl"
    manifest = json.loads(client.get("/researcher/studies/dl/manifest.json").data)
    root = tmp_path / "set"
    assert config["stimulus_set"]["manifest_sha256"]
    for entry in manifest["stimuli"] + manifest["images"]:
        assert entry["sha256"] == hashlib.sha256((root / entry["path"]).read_bytes()).hexdigest()
    assert len(manifest["stimuli"]) == 4 * 3
    assert client.get("/researcher/studies/dl/responses.xlsx").status_code == 404
