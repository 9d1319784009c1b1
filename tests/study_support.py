"""Helpers for the study backend tests: tiny stimulus sets, studies, API actions."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from PIL import Image

from study_app.stimuli import sha256_file


def write_stimulus_set(root: Path, n_images: int = 4, conditions=("l1", "l2", "ssim"),
                       size: int = 8, manifest: bool = True, seed: int = 0) -> Path:
    """A contract-1 folder of random PNGs (reconstructions = reference + condition noise)."""
    rng = np.random.default_rng(seed)
    (root / "reference").mkdir(parents=True, exist_ok=True)
    images, stimuli = [], []
    for i in range(n_images):
        ref = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        image_id = f"img{i:03d}"
        path = root / "reference" / f"{image_id}.png"
        Image.fromarray(ref).save(path)
        images.append({"id": image_id, "path": f"reference/{image_id}.png",
                       "sha256": sha256_file(path)})
        for level, condition in enumerate(conditions, start=1):
            (root / condition).mkdir(exist_ok=True)
            noise = rng.integers(-8 * level, 8 * level + 1, ref.shape)
            rec = np.clip(ref.astype(int) + noise, 0, 255).astype(np.uint8)
            spath = root / condition / f"{image_id}.png"
            Image.fromarray(rec).save(spath)
            mse = float(((rec.astype(float) - ref) ** 2).mean())
            stimuli.append({"image_id": image_id, "condition": condition,
                            "path": f"{condition}/{image_id}.png", "sha256": sha256_file(spath),
                            "metrics": {"mse": mse}})
    if manifest:
        data = {
            "format": "pstudy-stimulus-set", "format_version": 1, "name": root.name,
            "created_at": "2025-01-01T00:00:00Z", "image_size": [size, size], "channels": 3,
            "conditions": [{"name": c, "loss": c, "architecture": "test", "checkpoint_sha256": None,
                            "config": {}, "metrics": {}} for c in conditions],
            "images": images, "stimuli": stimuli,
            "provenance": {"config": {}, "config_sha256": "0" * 64, "seed": seed,
                           "package_versions": {}, "git_commit": None, "input_sha256": "0" * 64},
        }
        (root / "manifest.json").write_text(json.dumps(data, indent=1))
    return root


def make_study(app, set_root: Path, status: str = "live", **config) -> str:
    """Import ``set_root`` and create a study (default slug 'demo'); returns the slug."""
    from study_app.extensions import db
    from study_app.stimuli import import_stimulus_set
    from study_app.studies import create_study, parse_config, set_status

    settings = {"title": "Demo", "slug": "demo", **config}
    with app.app_context():
        stimulus_set = import_stimulus_set(set_root)
        study = create_study(stimulus_set, parse_config(settings))
        if status != "draft":
            set_status(study, "live")
            set_status(study, status)
        db.session.commit()
        return study.slug


def vote_body(token: str, choice: str = "left", rt_ms: float = 812.5) -> dict:
    shown = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
    return {
        "trial_token": token, "choice": choice, "rt_ms": rt_ms,
        "presented_at": shown.isoformat().replace("+00:00", "Z"),
        "answered_at": (shown + timedelta(milliseconds=rt_ms)).isoformat().replace("+00:00", "Z"),
        "viewport_w": 1280, "viewport_h": 800, "device_pixel_ratio": 2.0,
    }


class Participant:
    """A participant driving a Flask test client (or anything with .post/.get)."""

    def __init__(self, client, slug: str, **start):
        self.client = client
        response = client.post(f"/api/v1/studies/{slug}/participants", json=start)
        assert response.status_code in (200, 201), response.get_json()
        self.start_response = response
        self.token = response.get_json()["participant"]["token"]
        self.headers = {"Authorization": f"Bearer {self.token}"}

    def next(self):
        return self.client.post("/api/v1/participant/trials/next", headers=self.headers)

    def vote(self, token: str, choice: str = "left", **overrides):
        return self.client.post("/api/v1/participant/votes", headers=self.headers,
                                json={**vote_body(token, choice), **overrides})

    def finish(self, status: str = "completed"):
        return self.client.post("/api/v1/participant/finish", headers=self.headers,
                                json={"status": status})

    def complete(self, choose=lambda trial: "left") -> int:
        """Answer every trial offered until done; returns the number of votes."""
        n = 0
        while True:
            body = self.next().get_json()
            if body["done"]:
                return n
            if not body["trials"]:  # items momentarily locked by others: ask again
                time.sleep(0.05)
            for trial in body["trials"]:
                assert self.vote(trial["token"], choose(trial)).status_code == 200
                n += 1


def log_in_as_researcher(app, client) -> None:
    """A real login through the form (with its CSRF token) of a researcher made for it:
    an admin, who may see the studies ``make_study`` makes without an owner."""
    from tests.test_pages_support import login, make_researcher

    make_researcher(app, admin=True)
    response = login(client)
    assert response.status_code == 302, response.get_data(as_text=True)[:500]
