"""Separation between researchers (issue #21 item 2): every researcher route walked with a
stranger, a viewer, an editor, the owner and an admin; the index lists only what one may
see; stimulus sets are usable by their owner, admins and editors of a study over them;
sharing from the dashboard and from `pstudy study share`; the admin commands."""

from __future__ import annotations

import html
import re

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from study_app.access import EDIT, MANAGE, VIEW, allows
from tests.test_pages_support import (
    csrf_token,
    import_set,
    login,
    make_researcher,
    make_study,
    write_stimulus_set,
)
from tests.test_security import concrete_urls

PASSWORD = "a long enough password"
ROLES = ("stranger", "viewer", "editor", "owner", "admin")
# Researcher endpoints about one study -> the least role that may use them. A new route
# must be added here (or to NOT_ABOUT_A_STUDY), or the walk below fails.
ROLE_NEEDED = {
    "researcher.dashboard": VIEW,
    "researcher.dashboard_json": VIEW,
    "researcher.preference_plot": VIEW,
    "researcher.preview": VIEW,
    "researcher.download_responses": VIEW,
    "researcher.download_config": VIEW,
    "researcher.download_manifest": VIEW,
    "researcher.download_participants": VIEW,
    "researcher.download_prolific_ids": VIEW,
    "researcher.change_status": EDIT,
    "researcher.share": MANAGE,
    "researcher.unshare": MANAGE,
}
NOT_ABOUT_A_STUDY = {"researcher.index", "researcher.import_set", "researcher.new_study"}


def email(role: str) -> str:
    return f"{role}@example.org"


@pytest.fixture
def people(app, tmp_path):
    """Five researchers, a live study 'guarded' owned by 'owner' over a set 'owners-set'
    of theirs, shared with 'viewer' (viewer) and 'editor' (editor); one logged-in client
    per role."""
    from study_app.access import share_study
    from study_app.extensions import db
    from study_app.studies import find_study

    ids = {role: make_researcher(app, email(role), PASSWORD, admin=role == "admin")
           for role in ROLES}
    set_id = import_set(app, write_stimulus_set(tmp_path / "owners-set"), owner=ids["owner"])
    study = make_study(app, set_id, slug="guarded", owner=ids["owner"])
    with app.app_context():
        found = find_study("guarded")
        share_study(found, email("viewer"), "viewer")
        share_study(found, email("editor"), "editor")
        db.session.commit()
    clients = {}
    for role in ROLES:
        clients[role] = app.test_client()
        assert login(clients[role], email(role), PASSWORD).status_code == 302
    return {"ids": ids, "set": set_id, "study": study, "clients": clients}


def expected_status(role: str, needed: str, method: str) -> int:
    if role == "stranger":
        return 404
    if not allows(role, needed):
        return 403
    return 200 if method == "GET" else 303


def test_every_researcher_route_checks_the_role_on_the_study(app, people):
    walked = [(e, m, u) for e, m, u in concrete_urls(app, "guarded")
              if e.startswith("researcher.")]
    endpoints = {e for e, _, _ in walked}
    assert endpoints == set(ROLE_NEEDED) | NOT_ABOUT_A_STUDY, (
        "classify the new researcher route in ROLE_NEEDED or NOT_ABOUT_A_STUDY")
    for role in ROLES:
        client = people["clients"][role]
        token = csrf_token(client.get("/researcher/").get_data(as_text=True))
        for endpoint, method, url in walked:
            response = client.open(url, method=method, data={"csrf_token": token})
            if endpoint in ROLE_NEEDED:
                expected = expected_status(role, ROLE_NEEDED[endpoint], method)
                assert response.status_code == expected, (role, method, url,
                                                          response.status_code)
            else:
                assert response.status_code in (200, 303, 400), (role, method, url)


def test_a_stranger_cannot_tell_a_study_from_one_that_does_not_exist(app, people):
    stranger = people["clients"]["stranger"]
    for path in ("", "/dashboard.json", "/responses.csv", "/config.json", "/preview"):
        for headers in ({}, {"Accept": "application/json"}):
            hidden = stranger.get(f"/researcher/studies/guarded{path}", headers=headers)
            missing = stranger.get(f"/researcher/studies/no-such-one{path}", headers=headers)
            assert hidden.status_code == missing.status_code == 404
            assert hidden.get_data().replace(b"guarded", b"X") == missing.get_data().replace(
                b"no-such-one", b"X")
    # The participant API's preview and a draft's description: the same.
    assert stranger.post("/api/v1/studies/guarded/participants",
                         json={"preview": True}).status_code == 404
    viewer = people["clients"]["viewer"]
    assert viewer.post("/api/v1/studies/guarded/participants",
                       json={"preview": True}).status_code == 201
    make_study(app, people["set"], slug="draft-one", status="draft",
               owner=people["ids"]["owner"])
    assert stranger.get("/api/v1/studies/draft-one").status_code == 404
    assert people["clients"]["owner"].get("/api/v1/studies/draft-one").status_code == 200


def test_the_index_lists_only_what_the_researcher_may_see(app, people):
    make_study(app, people["set"], slug="admins-only")  # no owner: admins only
    pages = {role: people["clients"][role].get("/researcher/").get_data(as_text=True)
             for role in ROLES}
    for role in ROLES:
        assert ("(guarded)" in pages[role]) == (role != "stranger"), role
        assert ("(admins-only)" in pages[role]) == (role == "admin"), role
        # the set is usable by its owner, editors of a study over it, admins
        assert ("owners-set" in pages[role]) == (role in ("editor", "owner", "admin")), role
    assert email("owner") in pages["viewer"]  # the owner column


def test_new_studies_belong_to_their_creator_and_sets_to_their_users(app, people, tmp_path):
    from study_app.extensions import db
    from study_app.models import Study
    from tests.test_pages import study_form

    set_url = f"/researcher/studies/new?set={people['set']}"
    for role in ROLES:
        response = people["clients"][role].get(set_url)
        assert response.status_code == (404 if role in ("stranger", "viewer") else 200), role
    # A set one may not use is 404 like one that does not exist.
    missing = people["clients"]["viewer"].get("/researcher/studies/new?set=999999")
    assert missing.status_code == 404
    refused = people["clients"]["viewer"].get(set_url).get_data(as_text=True)
    assert error_message(refused).replace(f" {people['set']} ", " N ") == error_message(
        missing.get_data(as_text=True)).replace(" 999999 ", " N ")

    editor = people["clients"]["editor"]
    form = editor.get(set_url).get_data(as_text=True)
    created = editor.post(set_url, data=study_form(form, slug="editors-own"))
    assert created.status_code == 303
    with app.app_context():
        study = db.session.scalars(select(Study).where(Study.slug == "editors-own")).one()
        assert study.owner_id == study.created_by_id == people["ids"]["editor"]
    assert people["clients"]["owner"].get("/researcher/studies/editors-own").status_code == 404
    assert people["clients"]["admin"].get("/researcher/studies/editors-own").status_code == 200

    # An import through the form belongs to the importer: nobody else but admins sees it.
    app.config["STIMULUS_ROOTS"] = [str(tmp_path)]
    root = write_stimulus_set(tmp_path / "strangers-set")
    stranger = people["clients"]["stranger"]
    page = stranger.get("/researcher/").get_data(as_text=True)
    imported = stranger.post("/researcher/stimulus-sets",
                             data={"csrf_token": csrf_token(page), "path": str(root)})
    assert imported.status_code == 303
    assert stranger.get(imported.headers["Location"]).status_code == 200
    for role in ROLES:
        listed = "strangers-set" in people["clients"][role].get("/researcher/").get_data(True)
        assert listed == (role in ("stranger", "admin")), role
    # The same folder imported by the owner is their own row.
    page = people["clients"]["owner"].get("/researcher/").get_data(as_text=True)
    again = people["clients"]["owner"].post(
        "/researcher/stimulus-sets", data={"csrf_token": csrf_token(page), "path": str(root)})
    assert again.headers["Location"] != imported.headers["Location"]


def error_message(page: str) -> str:
    return re.search(r'id="error-message">(.*?)</p>', page).group(1)


def flashes(client, url: str = "/researcher/studies/guarded") -> str:
    text = client.get(url).get_data(as_text=True)
    return html.unescape(" ".join(re.findall(r'<p class="flash[^"]*"[^>]*>(.*?)</p>', text)))


def share(client, who: str, role: str = "viewer", slug: str = "guarded"):
    page = client.get(f"/researcher/studies/{slug}").get_data(as_text=True)
    return client.post(f"/researcher/studies/{slug}/collaborators",
                       data={"csrf_token": csrf_token(page), "email": who, "role": role})


def unshare(client, who: str, slug: str = "guarded"):
    page = client.get(f"/researcher/studies/{slug}").get_data(as_text=True)
    return client.post(f"/researcher/studies/{slug}/collaborators/remove",
                       data={"csrf_token": csrf_token(page), "email": who})


def pause(client):
    page = client.get("/researcher/studies/guarded").get_data(as_text=True)
    return client.post("/researcher/studies/guarded/status/pause",
                       data={"csrf_token": csrf_token(page)})


def test_the_owner_shares_changes_roles_and_removes_from_the_dashboard(app, people):
    owner, stranger = people["clients"]["owner"], people["clients"]["stranger"]
    dashboard = owner.get("/researcher/studies/guarded").get_data(as_text=True)
    assert 'id="share-form"' in dashboard and "viewer@example.org" in dashboard
    viewer_page = people["clients"]["viewer"].get("/researcher/studies/guarded")
    assert 'id="share-form"' not in viewer_page.get_data(as_text=True)
    assert 'id="action-pause"' not in viewer_page.get_data(as_text=True)  # no buttons
    assert 'id="action-pause"' in people["clients"]["editor"].get(
        "/researcher/studies/guarded").get_data(as_text=True)

    assert share(owner, "STRANGER@example.org").status_code == 303
    assert "stranger@example.org is a viewer" in flashes(owner)
    assert stranger.get("/researcher/studies/guarded").status_code == 200
    assert pause(stranger).status_code == 403
    assert share(owner, email("stranger"), "editor").status_code == 303
    assert "is an editor of this study now" in flashes(owner)
    assert pause(stranger).status_code == 303
    assert unshare(owner, email("stranger")).status_code == 303
    assert "no longer has access" in flashes(owner)
    assert stranger.get("/researcher/studies/guarded").status_code == 404

    share(owner, "nobody@example.org")
    assert "there is no researcher account 'nobody@example.org'" in flashes(owner)
    share(owner, email("owner"))
    assert "owns this study already" in flashes(owner)
    unshare(owner, "nobody@example.org")
    assert "is not a collaborator" in flashes(owner)
    # Editors and viewers cannot share; admins can.
    assert share(people["clients"]["editor"], email("stranger")).status_code == 403
    assert unshare(people["clients"]["viewer"], email("editor")).status_code == 403
    assert share(people["clients"]["admin"], email("stranger")).status_code == 303
    assert stranger.get("/researcher/studies/guarded").status_code == 200


def test_share_unshare_set_owner_and_admin_commands(app, people, tmp_path):
    from study_app.cli import main
    from study_app.extensions import db
    from study_app.models import Researcher, Study

    url = ["--database-url", app.config["SQLALCHEMY_DATABASE_URI"]]
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(main, [*args, *url])
        assert "Traceback" not in result.output
        return result

    shared = run("study", "share", "guarded", email("stranger"), "--role", "editor")
    assert shared.exit_code == 0
    assert "stranger@example.org is an editor of guarded (added)" in shared.output
    assert pause(people["clients"]["stranger"]).status_code == 303
    listed = run("study", "list")
    assert "owner@example.org" in listed.output and "stranger@example.org (editor)" in listed.output
    assert run("study", "unshare", "guarded", email("stranger")).exit_code == 0
    assert people["clients"]["stranger"].get("/researcher/studies/guarded").status_code == 404
    bad = run("study", "share", "guarded", "ghost@example.org")
    assert bad.exit_code == 1 and "pstudy researcher create" in bad.output
    assert run("study", "share", "nothing", email("viewer")).exit_code == 1

    # A study made on the command line: --owner, or nobody (admins only) until set-owner.
    root = write_stimulus_set(tmp_path / "cli-set")
    made = run("study", "create", str(root), "--slug", "cli-made", "--title", "CLI")
    assert made.exit_code == 0 and "only admins see it" in made.output
    assert people["clients"]["owner"].get("/researcher/studies/cli-made").status_code == 404
    assert people["clients"]["admin"].get("/researcher/studies/cli-made").status_code == 200
    moved = run("study", "set-owner", "cli-made", email("viewer"))
    assert moved.exit_code == 0 and "and its stimulus set" in moved.output
    assert people["clients"]["viewer"].get("/researcher/studies/cli-made").status_code == 200
    owned = run("study", "create", str(root), "--slug", "cli-owned", "--owner", email("editor"))
    assert owned.exit_code == 0 and "owner: editor@example.org" in owned.output
    with app.app_context():
        study = db.session.scalars(select(Study).where(Study.slug == "cli-owned")).one()
        assert study.owner_id == study.stimulus_set.owner_id == people["ids"]["editor"]
    assert run("study", "create", str(root), "--slug", "x-y",
               "--owner", "ghost@example.org").exit_code == 1

    # Admins.
    assert run("researcher", "grant-admin", email("stranger")).exit_code == 0
    assert people["clients"]["stranger"].get("/researcher/studies/guarded").status_code == 200
    accounts = run("researcher", "list").output
    assert re.search(r"stranger@example.org\tadmin", accounts)
    assert re.search(r"owner@example.org\t-\towns 1\tshared 0", accounts)
    assert re.search(r"viewer@example.org\t-\towns 1\tshared 1", accounts)
    assert run("researcher", "revoke-admin", email("stranger")).exit_code == 0
    assert people["clients"]["stranger"].get("/researcher/studies/guarded").status_code == 404
    run("researcher", "revoke-admin", email("admin"))
    last = run("researcher", "revoke-admin", email("admin"))
    assert "no admin is left" in last.output
    assert run("researcher", "grant-admin", "ghost@example.org").exit_code == 1
    new_admin = run("researcher", "create", "root@example.org", "--password", PASSWORD,
                    "--admin")
    assert new_admin.exit_code == 0 and "(admin)" in new_admin.output
    plain = run("researcher", "create", "plain@example.org", "--password", PASSWORD)
    assert plain.exit_code == 0 and "admin" not in plain.output
    with app.app_context():
        admins = db.session.scalars(select(Researcher.email).where(Researcher.is_admin)).all()
        assert admins == ["root@example.org"]


def test_the_first_account_of_a_database_is_an_admin(tmp_path):
    from study_app.cli import main

    url = ["--database-url", f"sqlite:///{tmp_path / 'first.sqlite3'}"]
    runner = CliRunner()
    first = runner.invoke(main, ["researcher", "create", "a@example.org", "--password",
                                 PASSWORD, *url])
    assert first.exit_code == 0 and "(admin: the first account)" in first.output
    second = runner.invoke(main, ["researcher", "create", "b@example.org", "--password",
                                  PASSWORD, *url])
    assert second.exit_code == 0 and "admin" not in second.output
    listed = runner.invoke(main, ["researcher", "list", *url]).output
    assert "a@example.org\tadmin" in listed and "b@example.org\t-" in listed
