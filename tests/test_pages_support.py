"""Helpers for the page, security and browser tests: a tiny real stimulus set on disk,
studies made through the backend's own functions, a researcher account, CSRF tokens.

(No tests here; the module is named so it sits next to the tests that use it.)
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage

REPO_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO_ROOT / "test-artifacts"
SCREENSHOTS = REPO_ROOT / "docs" / "screenshots"

PASSWORD = "correct horse battery staple"
EMAIL = "researcher@example.org"
CONDITIONS = ("blurred", "noisy", "sharp")


def write_stimulus_set(root: Path, n_images: int = 4, size: int = 16, seed: int = 0) -> Path:
    """A stimulus-set folder without manifest (inferred on import): ``reference/`` plus one
    folder per condition, ``size``×``size`` RGB PNGs derived from seeded noise."""
    rng = np.random.default_rng(seed)
    for folder in ("reference", *CONDITIONS):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for index in range(n_images):
        reference = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        blurred = (
            (
                reference.astype(np.int32)
                + np.roll(reference, 1, axis=0)
                + np.roll(reference, 1, axis=1)
            )
            // 3
        ).astype(np.uint8)
        noisy = np.clip(reference + rng.normal(0, 40, reference.shape), 0, 255).astype(np.uint8)
        sharp = np.clip(
            reference.astype(np.int32) + rng.integers(-8, 9, reference.shape), 0, 255
        ).astype(np.uint8)
        for folder, pixels in (
            ("reference", reference),
            ("blurred", blurred),
            ("noisy", noisy),
            ("sharp", sharp),
        ):
            PILImage.fromarray(pixels).save(root / folder / f"img{index:02d}.png")
    return root


def import_set(app, root: Path, owner: int | None = None) -> int:
    """Import the folder with the backend's importer (owned by the researcher id
    ``owner``); return the stimulus set id."""
    from study_app.extensions import db
    from study_app.stimuli import import_stimulus_set

    with app.app_context():
        stimulus_set = import_stimulus_set(root, owner_id=owner)
        db.session.commit()
        return stimulus_set.id


def make_study(
    app, set_id: int, slug: str = "demo", status: str = "live", owner: int | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Create a small study (K=2, M=4, 1 catch, 1 repeat, 1 practice) owned by the
    researcher id ``owner`` (None: unowned, only admins see it) and set its status."""
    from study_app.extensions import db
    from study_app.models import StimulusSet
    from study_app.studies import create_study, parse_config, set_status

    data = {
        "title": f"Study {slug}",
        "slug": slug,
        "votes_per_item": 2,
        "trials_per_participant": 4,
        "catch_trials": 1,
        "repeat_trials": 1,
        "practice_trials": 1,
        "completion_code": "C0DE-42",
        "batch_size": 4,
    }
    data.update(overrides)
    with app.app_context():
        stimulus_set = db.session.get(StimulusSet, set_id)
        study = create_study(stimulus_set, parse_config(data), researcher_id=owner)
        if status != "draft":
            set_status(study, "live")
            if status != "live":
                set_status(study, status)
        db.session.commit()
        return {"id": study.id, "slug": study.slug, "config": dict(study.config)}


def make_researcher(app, email: str = EMAIL, password: str = PASSWORD, admin: bool = False) -> int:
    from study_app.extensions import db
    from study_app.models import Researcher

    with app.app_context():
        researcher = Researcher(email=email, is_admin=admin)
        researcher.set_password(password)
        db.session.add(researcher)
        db.session.commit()
        return researcher.id


def csrf_token(html: str) -> str:
    """The CSRF token of the first form on a page."""
    match = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', html) or re.search(
        r'name="csrf_token" value="([^"]+)"', html
    )
    assert match, "no CSRF token on the page"
    return match.group(1)


def login(client, email: str = EMAIL, password: str = PASSWORD):
    page = client.get("/login")
    return client.post(
        "/login",
        data={
            "email": email,
            "password": password,
            "csrf_token": csrf_token(page.get_data(as_text=True)),
        },
    )


def votes_per_trial(app, study_id: int) -> dict[int, int]:
    """trial id -> number of stored votes (exactly-once means all values are 1)."""
    from sqlalchemy import func, select

    from study_app.extensions import db
    from study_app.models import Vote

    with app.app_context():
        rows = db.session.execute(
            select(Vote.trial_id, func.count())
            .where(Vote.study_id == study_id)
            .group_by(Vote.trial_id)
        ).all()
        return {trial_id: n for trial_id, n in rows}


def save_screenshot(page, name: str, docs_full_page: bool = True) -> None:
    """Keep a full-page screenshot in test-artifacts/; refresh docs/screenshots/ when
    asked to (``PSTUDY_UPDATE_SCREENSHOTS=1``), so a plain test run leaves tracked files
    alone (``docs_full_page=False``: the docs get only the first screen, for long pages)."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    if os.environ.get("PSTUDY_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=docs_full_page)
