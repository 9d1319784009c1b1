"""Issue #21 items 4, 5 and 9: login throttling counted in the database (per account and
per address, shared by every worker), hostile ``?set=`` values answered 400/404 on both
databases, and import by server path confined to ``STIMULUS_ROOTS``."""

from __future__ import annotations

import html
import os
import re
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from tests.test_pages_support import (
    EMAIL,
    PASSWORD,
    csrf_token,
    import_set,
    login,
    make_researcher,
    write_stimulus_set,
)


@pytest.fixture
def db_app(any_database_url):
    """The app on an empty SQLite file or PostgreSQL database, schema created."""
    from study_app import create_app
    from study_app.extensions import db

    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": any_database_url,
                      "SECRET_KEY": "test-secret"})
    with app.app_context():
        db.create_all()
    yield app
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


def failures(app, **where) -> int:
    from study_app.extensions import db
    from study_app.models import LoginFailure

    with app.app_context():
        query = select(func.count()).select_from(LoginFailure)
        for name, value in where.items():
            query = query.where(getattr(LoginFailure, name) == value)
        return db.session.scalar(query)


def age_failures(app, minutes: float) -> None:
    """Move every stored failure ``minutes`` into the past."""
    from study_app.extensions import db
    from study_app.models import LoginFailure

    with app.app_context():
        for row in db.session.scalars(select(LoginFailure)):
            row.created_at -= timedelta(minutes=minutes)
        db.session.commit()


# --------------------------------------------------------------------------- throttling


def test_the_attack_from_the_issue_is_stopped_per_account_without_checking_passwords(
    db_app, monkeypatch
):
    """40 wrong passwords: the first 5 are answered 401, the rest 429 with Retry-After
    and a message; the right password is then refused too, without being checked, until
    the failures leave the 15-minute window; a success clears the account's counter."""
    from study_app.models import Researcher

    make_researcher(db_app)
    client = db_app.test_client()
    codes = [login(client, password=f"guess {n}").status_code for n in range(40)]
    assert codes == [401] * 5 + [429] * 35
    assert failures(db_app) == 5  # refused attempts are not even counted

    checked = []
    original = Researcher.check_password
    monkeypatch.setattr(Researcher, "check_password",
                        lambda self, password: checked.append(password) or original(self,
                                                                                   password))
    refused = login(client)  # the right password
    assert refused.status_code == 429 and checked == []
    assert 1 <= int(refused.headers["Retry-After"]) <= 15 * 60
    text = html.unescape(refused.get_data(as_text=True))
    assert "Too many failed logins for this account" in text and "Wait 15 minutes" in text
    # The e-mail is compared as typed, case-insensitively.
    assert login(client, email=EMAIL.upper()).status_code == 429

    age_failures(db_app, 14)  # still inside the window: the wait is about a minute
    wait = login(client)
    assert wait.status_code == 429 and int(wait.headers["Retry-After"]) <= 60
    age_failures(db_app, 1.1)  # now the failures are older than 15 minutes
    assert login(client).status_code == 302 and checked == [PASSWORD]
    assert failures(db_app, email=EMAIL) == 0  # the success cleared the counter


def test_unknown_e_mails_count_like_accounts_and_an_address_has_its_own_limit(db_app):
    make_researcher(db_app)
    attacker = db_app.test_client()
    # 20 failures spread over 20 e-mails (4 per made-up account) from one address ...
    codes = [login(attacker, email=f"user{n % 5}@example.org").status_code for n in range(20)]
    assert codes == [401] * 20
    assert failures(db_app, email="user0@example.org") == 4
    # ... and the address is throttled, for every account, the real one included.
    blocked = login(attacker)
    assert blocked.status_code == 429
    assert "from your network address" in html.unescape(blocked.get_data(as_text=True))
    # Another address still logs in (the account itself has no failures).
    elsewhere = db_app.test_client()
    page = elsewhere.get("/login").get_data(as_text=True)
    response = elsewhere.post("/login", data={"email": EMAIL, "password": PASSWORD,
                                              "csrf_token": csrf_token(page)},
                              environ_base={"REMOTE_ADDR": "10.0.0.7"})
    assert response.status_code == 302


def test_the_counts_are_shared_by_every_worker_and_can_be_cleared(db_app):
    """Two apps on one database stand for two gunicorn workers (or hosts): failures made
    through one count in the other. `pstudy researcher unlock` clears an account."""
    from click.testing import CliRunner

    from study_app import create_app
    from study_app.cli import main

    make_researcher(db_app)
    url = db_app.config["SQLALCHEMY_DATABASE_URI"]
    other = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": url, "SECRET_KEY": "x"})
    first, second = db_app.test_client(), other.test_client()
    for n in range(5):
        assert login((first, second)[n % 2], password="wrong").status_code == 401
    assert login(first).status_code == 429 and login(second).status_code == 429
    unlocked = CliRunner().invoke(main, ["researcher", "unlock", EMAIL,
                                         "--database-url", url])
    assert unlocked.exit_code == 0 and "cleared 5 failed login(s)" in unlocked.output
    assert login(second).status_code == 302
    with other.app_context():
        from study_app.extensions import db

        db.engine.dispose()


def test_throttling_limits_are_settings(tmp_path):
    from study_app import create_app
    from study_app.extensions import db

    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path}/t.db",
                      "LOGIN_MAX_FAILURES_PER_ACCOUNT": 2, "LOGIN_MAX_FAILURES_PER_ADDRESS": 0})
    with app.app_context():
        db.create_all()
    make_researcher(app)
    client = app.test_client()
    assert [login(client, password="no").status_code for _ in range(3)] == [401, 401, 429]
    # no address limit: other accounts are not affected by this address's failures
    assert [login(client, email=f"x{n}@example.org").status_code for n in range(30)] == [401] * 30
    with app.app_context():
        db.engine.dispose()


# --------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize("value, status", [
    ("2147483648", 404),  # over PostgreSQL's INTEGER: was a 500 there
    ("9223372036854775808", 400),  # over a 64-bit integer: was a 500 on both
    ("99999999999999999999999999999999", 400),
    ("0", 404),
    ("-1", 400),
    ("1.5", 400),
    ("abc", 400),
    ("1;DROP TABLE study", 400),
    ("\u0663", 400),  # ARABIC-INDIC DIGIT THREE: int() would accept it
    (" 1", 400),
    ("9" * 5000, 400),
])
def test_hostile_set_values_are_answered_400_or_404_on_both_databases(db_app, tmp_path,
                                                                      value, status):
    owner = make_researcher(db_app)
    import_set(db_app, write_stimulus_set(tmp_path / "set"), owner=owner)
    client = db_app.test_client()
    login(client)
    token = csrf_token(client.get("/researcher/").get_data(as_text=True))
    for method in ("GET", "POST"):
        response = client.open("/researcher/studies/new", method=method,
                               query_string={"set": value}, data={"csrf_token": token})
        assert response.status_code == status, (method, value, response.status_code)
        message = html.unescape(re.search(r'id="error-message">(.*?)</p>',
                                          response.get_data(as_text=True)).group(1))
        assert ("number of a stimulus set" if status == 400 else "no stimulus set") in message
        assert len(message) < 200  # the junk is not echoed at length
    json_response = client.get("/researcher/studies/new", query_string={"set": value},
                               headers={"Accept": "application/json"})
    assert json_response.status_code == status and json_response.get_json()["error"]


def test_the_set_parameter_still_works(app, tmp_path):
    owner = make_researcher(app)
    set_id = import_set(app, write_stimulus_set(tmp_path / "set"), owner=owner)
    client = app.test_client()
    login(client)
    assert 'value="blurred"' in client.get(f"/researcher/studies/new?set={set_id}").get_data(
        as_text=True)
    assert client.get("/researcher/studies/new?set=").status_code == 200  # the only set
    assert 'value="blurred"' in client.get("/researcher/studies/new").get_data(as_text=True)


# --------------------------------------------------------------------------- import roots


def import_message(client, path: str) -> tuple[int, str]:
    page = client.get("/researcher/").get_data(as_text=True)
    response = client.post("/researcher/stimulus-sets",
                           data={"csrf_token": csrf_token(page), "path": path})
    shown = client.get("/researcher/").get_data(as_text=True)
    flashed = html.unescape(" ".join(re.findall(r'<p class="flash[^"]*"[^>]*>(.*?)</p>', shown)))
    return response.status_code, flashed.replace(repr(path), "PATH")


def test_import_by_path_only_inside_the_stimulus_roots_and_says_nothing_about_others(
    app, tmp_path
):
    root = tmp_path / "roots" / "stimuli"
    outside = tmp_path / "elsewhere"
    write_stimulus_set(outside / "secret-set")
    write_stimulus_set(root / "good")
    (root / "escape").symlink_to(outside / "secret-set", target_is_directory=True)
    (root / "loop").symlink_to(root / "loop")
    app.config["STIMULUS_ROOTS"] = [str(root)]
    make_researcher(app)
    client = app.test_client()
    login(client)

    answers = {}
    for path in ("/root", "/proc/self", "/etc", "/no/such/folder", str(outside / "secret-set"),
                 str(outside / "missing"), str(root / "escape"), str(root / ".." / "..")
                 + "/elsewhere/secret-set", "../elsewhere", "/tmp/\x00x"):
        status, message = import_message(client, path)
        assert status == 303
        answers[path] = message
    assert len(set(answers.values())) == 1, answers  # one answer whatever the path
    message = next(iter(answers.values()))
    assert message == (f"Could not import PATH: stimulus sets can be imported only from "
                       f"inside {root} (STIMULUS_ROOTS); copy the set there, or ask the "
                       "administrator to add its folder to STIMULUS_ROOTS")

    status, message = import_message(client, str(root / "missing"))
    assert "does not exist" in message  # inside the roots a precise answer is fine
    status, message = import_message(client, str(root / "loop"))  # a symlink loop
    assert status == 303 and message.startswith("Could not import PATH")
    status, message = import_message(client, "good")  # relative: inside the first root
    assert message.startswith("Imported stimulus set")
    from study_app.extensions import db
    from study_app.models import StimulusSet

    with app.app_context():
        assert db.session.scalars(select(StimulusSet.root)).all() == [
            os.path.realpath(root / "good")]


def test_the_default_root_is_the_instance_folder_and_a_bad_setting_is_named(tmp_path):
    from study_app import create_app
    from study_app.config import ConfigError
    from study_app.stimuli import stimulus_roots

    url = f"sqlite:///{tmp_path / 'r.sqlite3'}"
    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": url})
    assert stimulus_roots(app) == [
        type(tmp_path)(os.path.realpath(os.path.join(app.instance_path, "stimuli")))]
    listed = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": url,
                         "STIMULUS_ROOTS": f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}"})
    assert [p.name for p in stimulus_roots(listed)] == ["a", "b"]
    for bad in (5, [], [""], {"a": 1}):
        with pytest.raises(ConfigError, match="STIMULUS_ROOTS must be a list of folders"):
            create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": url,
                        "STIMULUS_ROOTS": bad})


def test_a_manifest_cannot_point_outside_its_folder(app, tmp_path):
    import json

    from study_app.stimuli import StimulusSetError, load_manifest
    from tests.study_support import write_stimulus_set as write_with_manifest

    root = write_with_manifest(tmp_path / "set")
    manifest = json.loads((root / "manifest.json").read_text())
    (tmp_path / "outside.png").write_bytes((root / "reference" / "img000.png").read_bytes())
    manifest["images"][0]["path"] = "../outside.png"
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StimulusSetError, match="'../outside.png' is outside the stimulus set"):
        load_manifest(root)
    manifest["images"][0]["path"] = str(tmp_path / "outside.png")
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StimulusSetError, match="is outside the stimulus set folder"):
        load_manifest(root)
    # Without a manifest: a file that is a symlink to somewhere else is refused too.
    (root / "manifest.json").unlink()
    (root / "l1" / "img001.png").unlink()
    (root / "l1" / "img001.png").symlink_to(tmp_path / "outside.png")
    with pytest.raises(StimulusSetError, match="'l1/img001.png' is outside"):
        load_manifest(root)
