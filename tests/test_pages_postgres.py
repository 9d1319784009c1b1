"""The researcher dashboard and downloads on a real PostgreSQL server."""

from __future__ import annotations

import io

import pandas as pd
import pytest

from tests.test_pages import vote_through_api
from tests.test_pages_support import (
    import_set,
    login,
    make_researcher,
    make_study,
    write_stimulus_set,
)


@pytest.mark.postgres
def test_dashboard_and_downloads_on_postgresql(postgres_url, tmp_path):
    from study_app import create_app
    from study_app.export import read_responses
    from study_app.extensions import db

    app = create_app(
        {"TESTING": True, "SQLALCHEMY_DATABASE_URI": postgres_url, "SECRET_KEY": "test-secret"}
    )
    with app.app_context():
        db.create_all()
    try:
        owner = make_researcher(app)
        set_id = import_set(app, write_stimulus_set(tmp_path / "set"), owner=owner)
        make_study(app, set_id, slug="pg", owner=owner)
        client = app.test_client()
        login(client)
        answered = vote_through_api(client, "pg", lambda trial: "right")
        data = client.get("/researcher/studies/pg/dashboard.json").get_json()
        assert data["responses"] == answered == 6
        assert data["participants"]["completed"] == 1
        csv = client.get("/researcher/studies/pg/responses.csv")
        from_csv = pd.read_csv(io.BytesIO(csv.data), keep_default_na=False)
        reference = read_responses(postgres_url, "pg")
        assert from_csv["chosen_condition"].tolist() == reference["chosen_condition"].tolist()
        assert set(from_csv["choice"]) == {"right"}
        assert client.get("/researcher/studies/pg/preference.png").status_code == 200
    finally:
        with app.app_context():
            db.session.remove()
            db.engine.dispose()
