"""Stimulus-set import (with and without manifest, hash verification), study configs,
status transitions, researcher accounts and the `pstudy study` / `researcher` commands."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from study_app.extensions import db
from study_app.models import Item, Researcher, Stimulus
from study_app.stimuli import StimulusSetError, import_stimulus_set, load_manifest
from study_app.studies import StudyConfigError, parse_config, set_status
from tests.study_support import make_study, write_stimulus_set


def test_import_with_and_without_manifest_gives_the_same_hashes(app, tmp_path):
    with_manifest = write_stimulus_set(tmp_path / "a", seed=3)
    without = write_stimulus_set(tmp_path / "b", seed=3, manifest=False)
    listed, inferred_a = load_manifest(with_manifest)
    inferred, inferred_b = load_manifest(without)
    assert (inferred_a, inferred_b) == (False, True)
    assert [c["name"] for c in inferred["conditions"]] == ["l1", "l2", "ssim"]
    assert {s["sha256"] for s in inferred["stimuli"]} == {s["sha256"] for s in listed["stimuli"]}
    with app.app_context():
        first = import_stimulus_set(without)
        again = import_stimulus_set(without)
        assert first.id == again.id  # importing twice is idempotent
        assert db.session.scalar(select(func.count(Stimulus.id))) == 12


def test_inferred_manifest_keeps_only_images_present_everywhere(tmp_path):
    root = write_stimulus_set(tmp_path / "s", manifest=False)
    (root / "l2" / "img000.png").unlink()
    manifest, _ = load_manifest(root)
    assert [i["id"] for i in manifest["images"]] == ["img001", "img002", "img003"]


def test_changed_file_fails_hash_verification_with_the_fix(tmp_path):
    root = write_stimulus_set(tmp_path / "s")
    (root / "l1" / "img001.png").write_bytes(b"not the same image")
    with pytest.raises(StimulusSetError, match="does not match the manifest.*regenerate"):
        load_manifest(root)


@pytest.mark.parametrize("breakage", ["no_reference", "one_condition", "bad_json", "format"])
def test_broken_sets_are_refused_with_a_clear_message(tmp_path, breakage):
    root = write_stimulus_set(tmp_path / "s", manifest=breakage in ("bad_json", "format"),
                              conditions=("only",) if breakage == "one_condition"
                              else ("l1", "l2"))
    if breakage == "no_reference":
        for path in (root / "reference").iterdir():
            path.unlink()
        (root / "reference").rmdir()
    if breakage == "bad_json":
        (root / "manifest.json").write_text("{")
    if breakage == "format":
        data = json.loads((root / "manifest.json").read_text())
        data["format_version"] = 99
        (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(StimulusSetError) as error:
        load_manifest(root)
    assert str(root) in str(error.value) or "manifest" in str(error.value)


def test_study_items_are_images_times_pairs(app, tmp_path):
    root = write_stimulus_set(tmp_path / "s")
    make_study(app, root, slug="all-pairs")
    make_study(app, root, slug="one-pair", pairs=[["ssim", "l1"]], images=["img000", "img002"])
    with app.app_context():
        counts = dict(db.session.execute(
            select(Item.study_id, func.count()).group_by(Item.study_id)).all())
        assert sorted(counts.values()) == [2, 4 * 3]


@pytest.mark.parametrize(("change", "message"), [
    ({"votes_per_item": 0}, "votes_per_item"),
    ({"question_mode": "maybe"}, "question_mode"),
    ({"slug": "Bad Slug"}, "slug"),
    ({"colour": "red"}, "unknown study setting"),
    ({"exclusion": {"min_catch_accuracy": 2}}, "min_catch_accuracy"),
    ({"exclusion": {"speed": 1}}, "unknown exclusion rule"),
    ({"completion_url": "ftp://x"}, "completion_url"),
    ({"repeat_trials": 50}, "repeat_trials"),
    ({"exposure_ms": 60_001}, "'exposure_ms' must be an integer 1..60000"),
    ({"exposure_ms": 0}, "exposure_ms"),
])
def test_invalid_configs_name_the_field(change, message):
    with pytest.raises(StudyConfigError, match=message):
        parse_config({"title": "T", "slug": "tt", **change})


def test_status_transitions(app, tmp_path):
    make_study(app, write_stimulus_set(tmp_path / "s"), status="draft")
    with app.app_context():
        from study_app.studies import find_study

        study = find_study("demo")
        with pytest.raises(StudyConfigError, match="cannot become paused"):
            set_status(study, "paused")
        for status in ("live", "paused", "live", "closed"):
            set_status(study, status)
        with pytest.raises(StudyConfigError, match="closed study cannot become live"):
            set_status(study, "live")


def test_pstudy_study_and_researcher_commands(tmp_path):
    from study_app.commands import researcher, study

    url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    root = write_stimulus_set(tmp_path / "set", manifest=False)
    config = tmp_path / "study.yaml"
    config.write_text("title: Loss study\nvotes_per_item: 3\ncatch_trials: 1\n"
                      "exclusion:\n  max_side_bias: 0.8\n")
    runner = CliRunner()
    created = runner.invoke(study, ["create", str(root), "--config", str(config), "-m", "7",
                                    "--live", "--database-url", url])
    assert created.exit_code == 0, created.output
    assert "participant link: http://127.0.0.1:8000/s/loss-study" in created.output
    assert "PROLIFIC_PID={{%PROLIFIC_PID%}}" in created.output
    # 4 images × 3 pairs = 12 items, K = 3: 36 votes, 7 main trials each -> 6 participants
    assert "design: 12 items × K=3 = 36 main votes; at least 6 participants at 7" in created.output
    assert "warning" not in created.output
    too_many = runner.invoke(study, ["create", str(root), "--slug", "too-many", "-m", "20",
                                     "--database-url", url])
    assert too_many.exit_code == 0, too_many.output
    assert "warning: M = 20 main trials per participant, but the design has only 12" \
        in too_many.output
    status = runner.invoke(study, ["status", "loss-study", "paused", "--database-url", url])
    assert status.exit_code == 0 and "loss-study: paused; 0/36 main votes" in status.output
    duplicate = runner.invoke(study, ["create", str(root), "--config", str(config),
                                      "--database-url", url])
    assert duplicate.exit_code == 1 and "exists" in duplicate.output
    bad = runner.invoke(study, ["create", str(root), "--slug", "x-y", "-k", "0",
                                "--database-url", url])
    assert bad.exit_code == 1 and "votes_per_item" in bad.output
    assert "Traceback" not in bad.output
    made = runner.invoke(researcher, ["create", "ada@example.org", "--password", "s3cret-pw",
                                      "--database-url", url])
    assert made.exit_code == 0, made.output
    short = runner.invoke(researcher, ["create", "bob@example.org", "--password", "short",
                                       "--database-url", url])
    assert short.exit_code == 2 and "at least 8" in short.output

    from study_app import create_app

    app = create_app({"SQLALCHEMY_DATABASE_URI": url})
    with app.app_context():
        account = db.session.scalars(select(Researcher)).one()
        assert account.password_hash != "s3cret-pw"
        assert account.check_password("s3cret-pw") and not account.check_password("wrong")
        from study_app.studies import find_study

        stored = find_study("loss-study").config
        assert (stored["trials_per_participant"], stored["votes_per_item"]) == (7, 3)
        assert stored["exclusion"]["max_side_bias"] == 0.8
        db.engine.dispose()
