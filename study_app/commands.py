"""``pstudy`` subcommands of the study app: study, serve, export, simulate, researcher.

Who may see what on the web pages (owners, collaborators, admins) is set here too:
``pstudy researcher create --admin`` / ``grant-admin`` / ``revoke-admin`` / ``list``,
``pstudy study create --owner``, ``pstudy study share`` / ``unshare`` / ``set-owner``.
The command line itself is not restricted: whoever can run it can read the database.

Each command works on the database given by ``--database-url`` (or ``DATABASE_URL``;
default: the SQLite file in the instance folder) and brings its schema up to date with
the migrations first.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import click

DATABASE_OPTION = click.option(
    "--database-url", envvar="DATABASE_URL", default=None,
    help="SQLAlchemy URL (env DATABASE_URL); default: instance/study.sqlite3.",
)


def make_app(database_url: str | None, migrate: bool = True):
    """The Flask app on ``database_url``, its schema migrated to the newest revision."""
    from study_app import create_app

    app = create_app({"SQLALCHEMY_DATABASE_URI": database_url} if database_url else None)
    if migrate:
        upgrade_database(app)
    return app


def upgrade_database(app) -> None:
    """Run the Alembic migrations up to head (idempotent, quiet).

    A database whose tables were made by ``db.create_all()`` (tests, notebooks) has no
    Alembic version yet: the tables a newer model added are created, then it is stamped
    as head (the migrations are tested to produce exactly the models' schema). One made
    before studies had owners is stamped at the revision before them and upgraded, so
    the migration adds the columns and assigns the owners; one made before the active
    design is stamped at revision 3, one made before the scheduling indexes (no
    ``item.draw_key``) at revision 4 to 7, one made before the pair tallies (no
    ``item.n_a_wins``) at revision 8, and upgraded.
    """
    from alembic import command
    from sqlalchemy import inspect

    from study_app.extensions import db

    with app.app_context():
        config = app.extensions["migrate"].migrate.get_config()
        config.attributes["quiet"] = True
        inspector = inspect(db.engine)
        tables = set(inspector.get_table_names())
        if "alembic_version" not in tables and {"study", "vote"} <= tables:
            study_columns = {c["name"] for c in inspector.get_columns("study")}
            item_columns = {c["name"] for c in inspector.get_columns("item")}
            if "n_a_wins" in item_columns:
                db.create_all()  # only what is missing
                command.stamp(config, "head")
            elif "draw_key" in item_columns:  # before the pair tallies: they are filled
                command.stamp(config, "0008_scheduling_load")
                command.upgrade(config, "head")
            elif "main_closed_at" in study_columns:  # before the scheduling indexes
                vote_columns = {c["name"] for c in inspector.get_columns("vote")}
                participant_columns = {c["name"] for c in inspector.get_columns("participant")}
                if "display_status" in participant_columns:
                    made_at = "0007_display_calibration"
                elif "second_onset_ms" in vote_columns:
                    made_at = "0006_jnd_task"
                elif "frame_period_ms" in vote_columns:
                    made_at = "0005_vote_exposure_timing"
                else:
                    made_at = "0004_active_design"
                command.stamp(config, made_at)
                command.upgrade(config, "head")
            elif "owner_id" in study_columns:  # made before the active design: migrate it
                command.stamp(config, "0003_owners_and_throttling")
                command.upgrade(config, "head")
            else:  # made before owners: bring it to revision 2, then migrate (owners)
                from study_app.models import ResearcherLogin

                if "researcher_login" not in tables:
                    ResearcherLogin.__table__.create(db.engine)
                command.stamp(config, "0002_researcher_login")
                command.upgrade(config, "head")
        else:
            command.upgrade(config, "head")


# --------------------------------------------------------------------------- study


@click.group("study")
def study() -> None:
    """Create studies from stimulus sets, list them, change their status."""


def _load_config_file(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise click.BadParameter(f"{path} is not valid YAML/JSON: {error}",
                                 param_hint="--config") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} must hold a mapping of study settings",
                                 param_hint="--config")
    return data


# study create's options for the ``calibration`` settings (study_app.calibration)
CALIBRATION_OPTIONS = {"mode": "calibration_mode", "viewing_distance": "viewing_distance",
                       "min_px_per_deg": "min_px_per_deg",
                       "require_unscaled": "require_unscaled",
                       "require_fullscreen": "require_fullscreen"}


@study.command("create")
@click.argument("stimulus_set", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False,
                                                         path_type=Path),
              help="YAML or JSON file of study settings (docs/study_app.md lists them).")
@click.option("--title", help="Title shown to participants (default: the set's name).")
@click.option("--slug", help="URL name, lowercase letters/digits/'-' (default from title).")
@click.option("-k", "--votes-per-item", type=int, help="K: votes wanted per image × pair.")
@click.option("-m", "--trials-per-participant", type=int, help="M: main trials per person.")
@click.option("--catch-trials", type=int, help="Catch trials per participant.")
@click.option("--repeat-trials", type=int, help="Repeat trials per participant.")
@click.option("--practice-trials", type=int, help="Practice trials (never stored).")
@click.option("--conditions", help="Comma-separated conditions (default: all).")
@click.option("--no-reference", is_flag=True, default=None,
              help="Ask 'which looks better?' without showing the reference.")
@click.option("--completion-code", help="Code shown (and sent to Prolific) at the end.")
@click.option("--completion-url", help="Redirect URL at the end (e.g. Prolific's).")
@click.option("--seed", type=int, help="Seed for trial order and side choices.")
@click.option("--design", type=click.Choice(["balanced", "active"]),
              help="balanced (default): K votes per item; active: the next pair by expected "
              "information gain, K the cap per item.")
@click.option("--stop-half-width", type=float,
              help="Active: stop main trials when every condition's 95 %% interval "
              "half-width is at most this (JOD, e.g. 0.2).")
@click.option("--vote-budget", type=int, help="Active: stop main trials at this many votes.")
@click.option("--task", type=click.Choice(["2afc", "jnd"]),
              help="2afc (which of two; default) or jnd (same or different? each condition "
                   "against its reference, shown sequentially).")
@click.option("--presentation", type=click.Choice(["side-by-side", "sequential"]),
              help="sequential: the two images one after the other at one place.")
@click.option("--first-ms", type=int, help="Sequential: first image, ms (default 500).")
@click.option("--isi-ms", type=int, help="Sequential: interval between them, ms (default 500).")
@click.option("--second-ms", type=int, help="Sequential: second image, ms (default 500).")
@click.option("--isi-mask", type=click.Choice(["grey", "noise", "none"]),
              help="Sequential: what the interval shows (default grey).")
@click.option("--calibration", "calibration_mode",
              type=click.Choice(["off", "optional", "required"]),
              help="Display calibration before the trials: the credit-card step (CSS px per "
              "mm), may be skipped when optional (default: off).")
@click.option("--viewing-distance", type=click.Choice(["off", "optional", "required"]),
              help="The blind-spot viewing-distance step after the card (default: optional).")
@click.option("--min-px-per-deg", type=float,
              help="Refuse displays giving fewer CSS pixels per degree (needs --calibration "
              "required --viewing-distance required).")
@click.option("--require-unscaled", is_flag=True, default=None,
              help="Refuse browser zoom other than 100 %% and fractional devicePixelRatio.")
@click.option("--require-fullscreen", is_flag=True, default=None,
              help="Trials only in fullscreen; leaving it pauses the study.")
@click.option("--live", is_flag=True, help="Open the study for participants right away.")
@click.option("--owner", metavar="EMAIL",
              help="Researcher who owns the study and its stimulus set (default: nobody, "
              "so only admins see it on the web pages).")
@click.option("--base-url", default="http://127.0.0.1:8000", show_default=True,
              help="Where the app is served (for the printed participant link).")
@DATABASE_OPTION
def study_create(stimulus_set: Path, config_file: Path | None, base_url: str, live: bool,
                 owner: str | None, database_url: str | None, **options: Any) -> None:
    """Create a study from STIMULUS_SET (a folder, with or without manifest.json).

    \b
    Examples:
      pstudy study create stimuli/demo --title "Loss study" -k 5 -m 20 --live
      pstudy study create stimuli/demo --config study.yaml --completion-code C0DE
      pstudy study create stimuli/demo --owner ada@example.org
      pstudy study create stimuli/demo --design active --stop-half-width 0.2 -k 3
      pstudy study create stimuli/demo --task jnd --first-ms 1000 --isi-ms 250 --second-ms 1000
      pstudy study create stimuli/demo --calibration required --require-unscaled
    """
    import re

    from study_app.extensions import db
    from study_app.stimuli import StimulusSetError, import_stimulus_set
    from study_app.studies import (
        StudyConfigError,
        create_study,
        design_summary,
        parse_config,
        set_status,
    )

    settings: dict[str, Any] = _load_config_file(config_file) if config_file else {}
    if options.pop("no_reference"):
        settings["question_mode"] = "no-reference"
    conditions = options.pop("conditions")
    if conditions:
        settings["conditions"] = [c.strip() for c in conditions.split(",") if c.strip()]
    calibration = {name: options.pop(option) for name, option in CALIBRATION_OPTIONS.items()}
    calibration = {name: value for name, value in calibration.items() if value is not None}
    if calibration:  # the options win over the file's calibration mapping, setting by setting
        from_file = settings.get("calibration")
        settings["calibration"] = {**(from_file if isinstance(from_file, dict) else {}),
                                   **calibration}
    settings.update({k: v for k, v in options.items() if v is not None})
    settings.setdefault("title", stimulus_set.resolve().name)
    if "slug" not in settings:
        settings["slug"] = re.sub(r"[^a-z0-9]+", "-", settings["title"].lower()).strip("-")[:80]
    app = make_app(database_url)
    with app.app_context():
        owner_id = _researcher_or_fail(owner).id if owner else None
        try:
            imported = import_stimulus_set(stimulus_set, owner_id=owner_id)
            config = parse_config(settings)
            created = create_study(imported, config, researcher_id=owner_id)
            if live:
                set_status(created, "live")
            db.session.commit()
        except (StimulusSetError, StudyConfigError, TypeError) as error:
            db.session.rollback()
            raise click.ClickException(str(error)) from None
        _warn_degenerate(imported.manifest, config.conditions)
        n_items = len(imported.images) if config.images is None else len(config.images)
        click.echo(f"created study '{created.slug}' ({created.status}) from "
                   f"{imported.name}: {created.config_sha256[:12]}…, K={config.votes_per_item},"
                   f" M={config.trials_per_participant}, {n_items} image(s)")
        click.echo(f"owner: {owner}" if owner else "owner: nobody — only admins see it on the "
                   f"web pages (pstudy study set-owner {created.slug} EMAIL)")
        design = design_summary(created, config)
        click.echo(f"design: {design['items']} items × K={config.votes_per_item} = "
                   f"{design['votes_wanted']} main votes; at least "
                   f"{design['participants_needed']} participants at "
                   f"{design['main_per_participant']} main trials each")
        if config.design == "active":
            stop = [f"95 % half-width <= {config.stop_half_width:g} JOD"] if (
                config.stop_half_width) else []
            stop += [f"{config.vote_budget} votes"] if config.vote_budget else []
            click.echo(f"active design: the next pair by expected information gain (every "
                       f"pair {config.pair_floor} votes first; K = cap per item); main "
                       f"trials stop at: {' or '.join(stop) or 'no target (close it yourself)'}")
        for warning in design["warnings"]:
            click.echo(f"warning: {warning}", err=True)
        link = f"{base_url.rstrip('/')}/s/{created.slug}"
        click.echo(f"participant link: {link}")
        click.echo("Prolific link:    " + link +
                   "?PROLIFIC_PID={{%PROLIFIC_PID%}}&STUDY_ID={{%STUDY_ID%}}"
                   "&SESSION_ID={{%SESSION_ID%}}")


def _warn_degenerate(manifest: dict, conditions: list[str] | None) -> None:
    """Warn (stderr) when the set's generation guard flagged a condition the study uses:
    its stimuli are flat, identical, black or artefacts, whatever the loss."""
    flagged = [
        c for c in manifest.get("conditions", [])
        if isinstance(c.get("guard"), dict) and c["guard"].get("ok") is False
        and (conditions is None or c.get("name") in conditions)
    ]
    if flagged:
        names = "; ".join(f"{c['name']}: {c['guard'].get('verdict', 'DEGENERATE')}"
                          for c in flagged)
        click.echo(f"warning: the generation guard flagged {len(flagged)} condition(s) of this "
                   f"stimulus set as degenerate ({names}); votes on them measure training "
                   "failures, not the loss. Regenerate the set (docs/generation.md, "
                   "'Degeneracy guard') or leave them out with --conditions.", err=True)


@study.command("status")
@click.argument("slug")
@click.argument("new_status", required=False,
                type=click.Choice(["draft", "live", "paused", "closed"]))
@DATABASE_OPTION
def study_status(slug: str, new_status: str | None, database_url: str | None) -> None:
    """Show a study's status, votes and participants, or set NEW_STATUS.

    \b
    Examples:
      pstudy study status loss-study
      pstudy study status loss-study live
    """
    from sqlalchemy import func, select

    from study_app.extensions import db
    from study_app.models import Item, Participant
    from study_app.studies import StudyConfigError, find_study, set_status

    app = make_app(database_url)
    with app.app_context():
        found = find_study(slug)
        if found is None:
            raise click.ClickException(f"no study {slug!r}; `pstudy study list` shows them")
        if new_status:
            try:
                set_status(found, new_status)
            except StudyConfigError as error:
                raise click.ClickException(str(error)) from None
            db.session.commit()
        votes, items = db.session.execute(
            select(func.coalesce(func.sum(Item.n_votes), 0), func.count(Item.id))
            .where(Item.study_id == found.id)).one()
        by_status = dict(db.session.execute(
            select(Participant.status, func.count()).where(
                Participant.study_id == found.id, Participant.preview.is_(False))
            .group_by(Participant.status)).all())
        k = found.config["votes_per_item"]
        click.echo(f"{found.slug}: {found.status}; {votes}/{items * k} main votes "
                   f"({items} items × K={k}); participants {by_status or 'none'}")


@study.command("list")
@DATABASE_OPTION
def study_list(database_url: str | None) -> None:
    """List the studies in the database: id, slug, status, title, owner, collaborators."""
    from sqlalchemy import select

    from study_app.access import collaborators
    from study_app.extensions import db
    from study_app.models import Study

    app = make_app(database_url)
    with app.app_context():
        for row in db.session.scalars(select(Study).order_by(Study.id)):
            shared = ", ".join(f"{email} ({role})" for email, role in collaborators(row))
            click.echo(f"{row.id}\t{row.slug}\t{row.status}\t{row.title}\t"
                       f"{row.owner.email if row.owner else '(no owner)'}\t{shared}")


def _researcher_or_fail(email: str):
    """The account with ``email`` (inside an app context), or a ClickException."""
    from study_app.auth import researcher_by_email

    account = researcher_by_email(email)
    if account is None:
        raise click.ClickException(
            f"no researcher {email}; create one with: pstudy researcher create {email}"
        )
    return account


def _study_or_fail(slug: str):
    from study_app.studies import find_study

    found = find_study(slug)
    if found is None:
        raise click.ClickException(f"no study {slug!r}; `pstudy study list` shows them")
    return found


@study.command("share")
@click.argument("slug")
@click.argument("email")
@click.option("--role", type=click.Choice(["viewer", "editor"]), default="viewer",
              show_default=True, help="viewer: dashboard, downloads, preview; editor: also "
              "start / pause / close.")
@DATABASE_OPTION
def study_share(slug: str, email: str, role: str, database_url: str | None) -> None:
    """Share study SLUG with the researcher EMAIL (or change their role).

    \b
    Examples:
      pstudy study share loss-study bob@example.org --role editor
      pstudy study share loss-study eve@example.org            # viewer
    """
    from study_app.access import AccessError, share_study
    from study_app.extensions import db

    app = make_app(database_url)
    with app.app_context():
        found = _study_or_fail(slug)
        try:
            account, outcome = share_study(found, email, role)
        except AccessError as error:
            raise click.ClickException(str(error)) from None
        db.session.commit()
        click.echo(f"{account.email} is {'an' if role == 'editor' else 'a'} {role} of "
                   f"{found.slug} ({outcome})")


@study.command("unshare")
@click.argument("slug")
@click.argument("email")
@DATABASE_OPTION
def study_unshare(slug: str, email: str, database_url: str | None) -> None:
    """Take the collaborator EMAIL's access to study SLUG away.

    \b
    Example:
      pstudy study unshare loss-study bob@example.org
    """
    from study_app.access import AccessError, unshare_study
    from study_app.extensions import db

    app = make_app(database_url)
    with app.app_context():
        found = _study_or_fail(slug)
        try:
            account = unshare_study(found, email)
        except AccessError as error:
            raise click.ClickException(str(error)) from None
        db.session.commit()
        click.echo(f"{account.email} no longer has access to {found.slug}")


@study.command("set-owner")
@click.argument("slug")
@click.argument("email")
@click.option("--with-set/--without-set", default=True, show_default=True,
              help="Give the study's stimulus set to the new owner too, when it has no owner "
              "or belonged to the old one.")
@DATABASE_OPTION
def study_set_owner(slug: str, email: str, with_set: bool, database_url: str | None) -> None:
    """Make the researcher EMAIL the owner of study SLUG (e.g. a study made on the command
    line without --owner). A collaborator who becomes owner stops being a collaborator.

    \b
    Example:
      pstudy study set-owner loss-study ada@example.org
    """
    from sqlalchemy import delete

    from study_app.extensions import db
    from study_app.models import StudyCollaborator

    app = make_app(database_url)
    with app.app_context():
        found = _study_or_fail(slug)
        account = _researcher_or_fail(email)
        old_owner = found.owner_id
        found.owner_id = account.id
        db.session.execute(delete(StudyCollaborator).where(
            StudyCollaborator.study_id == found.id,
            StudyCollaborator.researcher_id == account.id))
        stimulus_set = found.stimulus_set
        if with_set and stimulus_set.owner_id in (None, old_owner):
            stimulus_set.owner_id = account.id
        db.session.commit()
        click.echo(f"{account.email} owns {found.slug}"
                   + (f" and its stimulus set '{stimulus_set.name}'"
                      if stimulus_set.owner_id == account.id else ""))


# --------------------------------------------------------------------------- serve


def _secret_key(instance_path: str) -> str:
    """A persistent random key in the instance folder, shared by all workers."""
    path = Path(instance_path) / "secret_key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()


@click.command("serve")
@click.option("--bind", "-b", default="127.0.0.1:8000", show_default=True,
              help="Address gunicorn listens on.")
@click.option("--workers", "-w", type=click.IntRange(1, 256), default=None,
              help="Worker processes (default: cores, at least 2).")
@click.option("--threads", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Threads per worker.")
@click.option("--access-log", is_flag=True, help="Log every request to stdout.")
@click.option("--migrate/--no-migrate", default=True, show_default=True,
              help="Upgrade the database schema before serving.")
@DATABASE_OPTION
def serve(bind: str, workers: int | None, threads: int, access_log: bool, migrate: bool,
          database_url: str | None) -> None:
    """Serve the study app with gunicorn (study_app/gunicorn.conf.py).

    \b
    Examples:
      pstudy serve
      pstudy serve --bind 0.0.0.0:8000 --workers 4 --database-url postgresql+psycopg://…
    """
    import shutil

    app = make_app(database_url, migrate=migrate)
    env = dict(os.environ)
    env["DATABASE_URL"] = app.config["SQLALCHEMY_DATABASE_URI"]
    env.setdefault("SECRET_KEY", _secret_key(app.instance_path))
    env["PSTUDY_BIND"] = bind
    env["PSTUDY_THREADS"] = str(threads)
    if workers:
        env["PSTUDY_WORKERS"] = str(workers)
    if access_log:
        env["PSTUDY_ACCESS_LOG"] = "-"
    gunicorn = shutil.which("gunicorn", path=str(Path(sys.executable).parent)) or "gunicorn"
    config = str(Path(__file__).with_name("gunicorn.conf.py"))
    click.echo(f"serving on http://{bind} (gunicorn, {config})", err=True)
    os.execvpe(gunicorn, [gunicorn, "-c", config, "study_app:create_app()"], env)


# --------------------------------------------------------------------------- export


@click.command("export")
@click.argument("study_key", metavar="STUDY")
@click.option("--output", "-o", type=click.Path(dir_okay=False, allow_dash=True),
              required=True, help="Output file (.csv or .parquet); '-' writes CSV to stdout.")
@click.option("--format", "fmt", type=click.Choice(["csv", "parquet"]), default=None,
              help="Default: from the output file's suffix.")
@DATABASE_OPTION
def export(study_key: str, output: str, fmt: str | None, database_url: str | None) -> None:
    """Export STUDY's responses (slug or id) per contract 2, streamed.

    Parquet files carry the study config and stimulus-manifest hash in their metadata;
    a CSV gets them in ``<output>.provenance.json``.

    \b
    Examples:
      pstudy export loss-study -o responses.parquet
      pstudy export loss-study -o - | head
    """
    from study_app import export as exporter
    from study_app.extensions import db

    fmt = fmt or ("parquet" if output.endswith(".parquet") else "csv")
    if fmt == "parquet" and output == "-":
        raise click.BadParameter("Parquet cannot go to stdout; give a file name",
                                 param_hint="--output")
    app = make_app(database_url)
    with app.app_context(), db.engine.connect() as connection:
        try:
            meta = exporter.provenance(connection, study_key)
        except exporter.ExportError as error:
            raise click.ClickException(str(error)) from None
        if fmt == "parquet":
            n = exporter.write_parquet(connection, study_key, output)
        elif output == "-":
            n = exporter.write_csv(connection, study_key, sys.stdout)
        else:
            with open(output, "w", newline="") as handle:
                n = exporter.write_csv(connection, study_key, handle)
            Path(output + ".provenance.json").write_text(json.dumps(meta, indent=1))
    click.echo(f"exported {n} responses of '{meta['study']}' to {output}", err=True)


# --------------------------------------------------------------------------- simulate


@click.command("simulate")
@click.argument("base_url")
@click.argument("slug")
@click.option("--participants", "-n", type=click.IntRange(1), default=20, show_default=True)
@click.option("--concurrency", "-c", type=click.IntRange(1, 1000), default=20,
              show_default=True, help="Participants active at once.")
@click.option("--observer", type=click.Choice(["random", "one-side", "metric"]),
              default="random", show_default=True)
@click.option("--noise", type=click.FloatRange(0), default=0.02, show_default=True,
              help="metric observer: SD of the noise added to each RMSE (pixels in [0,1]).")
@click.option("--side", type=click.Choice(["left", "right"]), default="left",
              help="one-side observer: the side it always picks.")
@click.option("--fetch-images", is_flag=True, help="Download every image like a browser.")
@click.option("--seed", type=int, default=0, show_default=True)
def simulate(base_url: str, slug: str, participants: int, concurrency: int, observer: str,
             noise: float, side: str, fetch_images: bool, seed: int) -> None:
    """Run synthetic participants against a served study at BASE_URL.

    \b
    Examples:
      pstudy simulate http://127.0.0.1:8000 loss-study -n 100 -c 100
      pstudy simulate http://127.0.0.1:8000 loss-study --observer metric --noise 0.01
    """
    import numpy as np
    import requests

    from study_app.simulate import run_simulation

    try:
        info = requests.get(f"{base_url.rstrip('/')}/api/v1/studies/{slug}", timeout=10)
    except requests.RequestException as error:
        raise click.ClickException(f"cannot reach {base_url}: {error}; is `pstudy serve` "
                                   "running?") from None
    if info.status_code != 200:
        raise click.ClickException(f"study {slug!r} at {base_url}: {info.status_code} "
                                   f"{info.text[:200]}")
    if observer == "metric" and not info.json()["study"]["reference_shown"]:
        raise click.UsageError("the metric observer needs a study that shows the reference")
    result = run_simulation(base_url, slug, participants, concurrency, observer, noise, side,
                            seed, fetch_images)
    latencies = result.latencies_ms()
    p50, p99 = (np.percentile(latencies, [50, 99]) if len(latencies) else (float("nan"),) * 2)
    click.echo(f"{result.completed}/{participants} participants completed, "
               f"{len(result.votes)} votes in {result.wall_s:.1f} s "
               f"({len(result.votes) / max(result.wall_s, 1e-9):.1f} votes/s), vote latency "
               f"p50 {p50:.1f} ms p99 {p99:.1f} ms, {result.retries} retries")
    for error in result.errors[:10]:
        click.echo(f"error: {error}", err=True)
    if result.errors:
        raise SystemExit(1)


# --------------------------------------------------------------------------- researcher


@click.group("researcher")
def researcher() -> None:
    """Researcher accounts (log in to the dashboard)."""


@researcher.command("create")
@click.argument("email")
@click.option("--password", envvar="PSTUDY_RESEARCHER_PASSWORD", prompt=True,
              hide_input=True, confirmation_prompt=True,
              help="Prompted when not given (env PSTUDY_RESEARCHER_PASSWORD).")
@click.option("--admin", is_flag=True,
              help="An admin sees and may do everything (the first account is one anyway).")
@DATABASE_OPTION
def researcher_create(email: str, password: str, admin: bool, database_url: str | None) -> None:
    """Create a researcher account EMAIL (password hashed with werkzeug). The first account
    of a database becomes an admin; later ones only with --admin.

    \b
    Examples:
      pstudy researcher create ada@example.org
      pstudy researcher create root@example.org --admin
    """
    from sqlalchemy import select

    from study_app.extensions import db
    from study_app.models import Researcher

    if "@" not in email or len(email) > 254:
        raise click.BadParameter(f"{email!r} is not an e-mail address", param_hint="EMAIL")
    if len(password) < 8:
        raise click.BadParameter("use at least 8 characters", param_hint="--password")
    app = make_app(database_url)
    with app.app_context():
        if db.session.scalars(select(Researcher).where(Researcher.email == email)).first():
            raise click.ClickException(f"a researcher {email} exists already")
        first = db.session.scalars(select(Researcher.id).limit(1)).first() is None
        account = Researcher(email=email, is_admin=admin or first)
        account.set_password(password)
        db.session.add(account)
        db.session.commit()
    click.echo(f"created researcher {email}"
               + (" (admin: the first account)" if first and not admin
                  else " (admin)" if admin else ""))


@researcher.command("set-password")
@click.argument("email")
@click.option("--password", envvar="PSTUDY_RESEARCHER_PASSWORD", prompt="New password",
              hide_input=True, confirmation_prompt=True,
              help="Prompted when not given (env PSTUDY_RESEARCHER_PASSWORD).")
@DATABASE_OPTION
def researcher_set_password(email: str, password: str, database_url: str | None) -> None:
    """Give researcher EMAIL a new password and end every login of that account (every
    browser must log in again: use it when a password or a laptop was lost).

    \b
    Example:
      pstudy researcher set-password ada@example.org
    """
    from study_app.auth import end_logins, researcher_by_email
    from study_app.extensions import db

    if len(password) < 8:
        raise click.BadParameter("use at least 8 characters", param_hint="--password")
    app = make_app(database_url)
    with app.app_context():
        account = researcher_by_email(email)
        if account is None:
            raise click.ClickException(
                f"no researcher {email}; create one with: pstudy researcher create {email}"
            )
        account.set_password(password)
        ended = end_logins(researcher_id=account.id)
        stored_email = account.email
        db.session.commit()
    click.echo(f"new password for {stored_email}; ended {ended} open login(s)")


@researcher.command("list")
@DATABASE_OPTION
def researcher_list(database_url: str | None) -> None:
    """List the researcher accounts: e-mail, admin or not, studies owned and shared.

    \b
    Example:
      pstudy researcher list
    """
    from sqlalchemy import func, select

    from study_app.extensions import db
    from study_app.models import Researcher, Study, StudyCollaborator

    app = make_app(database_url)
    with app.app_context():
        owned = dict(db.session.execute(
            select(Study.owner_id, func.count()).group_by(Study.owner_id)).all())
        shared = dict(db.session.execute(
            select(StudyCollaborator.researcher_id, func.count())
            .group_by(StudyCollaborator.researcher_id)).all())
        accounts = db.session.scalars(select(Researcher).order_by(Researcher.id)).all()
        for account in accounts:
            click.echo(f"{account.email}\t{'admin' if account.is_admin else '-'}\t"
                       f"owns {owned.get(account.id, 0)}\tshared {shared.get(account.id, 0)}\t"
                       f"created {account.created_at:%Y-%m-%d}")
        if not accounts:
            click.echo("no researchers; create one with: pstudy researcher create EMAIL")
        unowned = owned.get(None, 0)
        if unowned:
            click.echo(f"{unowned} study(ies) without owner (admins only; pstudy study "
                       "set-owner SLUG EMAIL)")


def _set_admin(email: str, admin: bool, database_url: str | None) -> None:
    from sqlalchemy import func, select

    from study_app.extensions import db
    from study_app.models import Researcher

    app = make_app(database_url)
    with app.app_context():
        account = _researcher_or_fail(email)
        account.is_admin = admin
        db.session.commit()
        admins = db.session.scalar(
            select(func.count()).select_from(Researcher).where(Researcher.is_admin))
        click.echo(f"{account.email} is {'now' if admin else 'no longer'} an admin "
                   f"({admins} admin(s) in all)")
        if not admins:
            click.echo("warning: no admin is left; studies without an owner are seen by "
                       "nobody (pstudy researcher grant-admin EMAIL)", err=True)


@researcher.command("grant-admin")
@click.argument("email")
@DATABASE_OPTION
def researcher_grant_admin(email: str, database_url: str | None) -> None:
    """Make researcher EMAIL an admin: sees and may do everything on every study.

    \b
    Example:
      pstudy researcher grant-admin ada@example.org
    """
    _set_admin(email, True, database_url)


@researcher.command("revoke-admin")
@click.argument("email")
@DATABASE_OPTION
def researcher_revoke_admin(email: str, database_url: str | None) -> None:
    """Take researcher EMAIL's admin role away (their own and shared studies stay).

    \b
    Example:
      pstudy researcher revoke-admin ada@example.org
    """
    _set_admin(email, False, database_url)


@researcher.command("unlock")
@click.argument("email")
@DATABASE_OPTION
def researcher_unlock(email: str, database_url: str | None) -> None:
    """Forget the failed logins of EMAIL, so the login form stops answering 429 for it
    (failures counted per network address stay until they age out).

    \b
    Example:
      pstudy researcher unlock ada@example.org
    """
    from study_app.extensions import db
    from study_app.throttle import clear_login_failures

    app = make_app(database_url)
    with app.app_context():
        cleared = clear_login_failures(email)
        db.session.commit()
    click.echo(f"cleared {cleared} failed login(s) of {email}")
