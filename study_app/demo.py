"""``pstudy demo``: the whole study on embedded defaults, in one command.

1. generate a stimulus set (``pstudy generate``; reused when its configuration and inputs
   are unchanged),
2. create a study from it on SQLite (or ``--database-url``) and a researcher account,
3. serve the app under gunicorn on 127.0.0.1,
4. optionally let N synthetic participants vote through the HTTP API, export the votes
   and write the analysis report,
5. keep serving until Ctrl-C (or ``--serve-for`` seconds), then stop gunicorn cleanly.

Every step is one of the public commands (generate, study create, serve, simulate,
export, analyze), so the demo shows exactly what a user would run by hand.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import click

DEMO_RESEARCHER = "researcher@example.org"
HEALTH_TIMEOUT_S = 60.0


@dataclass
class DemoPaths:
    """Where one demo folder keeps its parts."""

    root: Path

    @property
    def stimuli(self) -> Path:
        return self.root / "stimuli"

    @property
    def database(self) -> Path:
        return self.root / "study.sqlite3"

    @property
    def password_file(self) -> Path:
        return self.root / "researcher-password.txt"

    @property
    def instance(self) -> Path:
        return self.root / "instance"

    def run_folder(self, slug: str) -> Path:
        return self.root / "runs" / slug


def port_is_free(host: str, port: int) -> bool:
    """True when nothing listens on ``host:port``."""
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def pick_port(host: str, wanted: int) -> int:
    """``wanted`` when free, else any free port on ``host``."""
    if port_is_free(host, wanted):
        return wanted
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def pstudy_command(*args: str) -> list[str]:
    """The ``pstudy`` command line for this interpreter (works without the script on PATH)."""
    return [sys.executable, "-m", "study_app", *args]


def run_step(title: str, command: list[str], env: dict[str, str] | None = None) -> None:
    """Run one public command, its output streamed; a failure stops the demo with its name."""
    click.secho(f"\n==> {title}", bold=True, err=True)
    click.echo("    $ " + " ".join(["pstudy", *command[3:]]), err=True)
    completed = subprocess.run(command, env=env)
    if completed.returncode != 0:
        raise click.ClickException(f"step '{title}' failed (exit {completed.returncode})")


def researcher_password(paths: DemoPaths) -> str:
    """The demo researcher's password, made once and kept in the demo folder (mode 600)."""
    if paths.password_file.exists():
        return paths.password_file.read_text().strip()
    password = secrets.token_urlsafe(12)
    paths.password_file.write_text(password + "\n")
    paths.password_file.chmod(0o600)
    return password


def ensure_researcher(app, email: str, password: str) -> int:
    """Create the demo researcher account unless it exists (its password is reset); it is
    an admin, as the first account of an installation is. -> its id."""
    from sqlalchemy import select

    from study_app.extensions import db
    from study_app.models import Researcher

    with app.app_context():
        account = db.session.scalars(select(Researcher).where(Researcher.email == email)).first()
        if account is None:
            account = Researcher(email=email)
            db.session.add(account)
        account.set_password(password)
        account.is_admin = True
        db.session.commit()
        return account.id


def create_demo_study(app, stimuli: Path, slug: str, votes_per_item: int, trials: int,
                      owner_id: int | None = None) -> str:
    """Import the stimulus set (deduplicated by its manifest) and create a live study,
    both owned by ``owner_id``."""
    from study_app.extensions import db
    from study_app.stimuli import import_stimulus_set
    from study_app.studies import create_study, parse_config, set_status

    with app.app_context():
        imported = import_stimulus_set(stimuli, owner_id=owner_id)
        config = parse_config({
            "title": f"Which reconstruction is closer? ({imported.name})",
            "slug": slug,
            "votes_per_item": votes_per_item,
            "trials_per_participant": trials,
            "completion_code": "DEMO-" + slug[-6:].upper(),
            "seed": 0,
        })
        study = create_study(imported, config, researcher_id=owner_id)
        set_status(study, "live")
        db.session.commit()
        return study.slug


def wait_until_healthy(base_url: str, server: subprocess.Popen, timeout_s: float) -> None:
    """Poll ``/healthz`` until it answers 200; fail when gunicorn exits or time runs out."""
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise click.ClickException(f"gunicorn exited with code {server.returncode}")
        try:
            if requests.get(base_url + "/healthz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise click.ClickException(f"the server did not answer at {base_url} in {timeout_s:.0f} s")


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM gunicorn's master (graceful), then SIGKILL its group if it lingers."""
    if server.poll() is not None:
        return
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=5)


@click.command("demo", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("demo-output"), show_default=True,
              help="Folder for the stimulus set, the SQLite database and the reports.")
@click.option("--preset", type=click.Choice(["smoke", "demo", "paper"]), default="demo",
              show_default=True, help="Generation preset (smoke: seconds; demo: 4–6 min on "
              "2 CPU cores; paper: GPU-sized).")
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False),
              help="A folder of your own images instead of scikit-image's photographs.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Training device.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU threads for training (default: torch's choice; 1 is often fastest "
              "on a busy 2-core machine).")
@click.option("--database-url", envvar="DATABASE_URL", default=None,
              help="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db "
              "(default: OUT/study.sqlite3).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to serve on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True,
              help="Port to serve on (another free port is used when it is taken).")
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True,
              help="gunicorn worker processes.")
@click.option("-k", "--votes-per-item", type=click.IntRange(1), default=3, show_default=True,
              help="K: votes wanted per image × condition pair.")
@click.option("-m", "--trials-per-participant", type=click.IntRange(1), default=18,
              show_default=True, help="M: main trials per participant.")
@click.option("--simulate", "n_simulated", type=click.IntRange(0), default=0,
              show_default=True, help="Let N synthetic participants vote over HTTP, then "
              "export and analyse the votes.")
@click.option("--serve-for", type=click.FloatRange(0), default=None,
              help="Seconds to keep serving at the end (default: until Ctrl-C when run in a "
              "terminal, 0 otherwise).")
def demo(out_dir: Path, preset: str, data_dir: str | None, device: str, threads: int | None,
         database_url: str | None, host: str, port: int, workers: int, votes_per_item: int,
         trials_per_participant: int, n_simulated: int, serve_for: float | None) -> None:
    """Run the whole study on embedded defaults: generate → study → serve → (simulate →
    export → analyse).

    \b
    Examples:
      pstudy demo                               # generate, create, serve until Ctrl-C
      pstudy demo --simulate 30                 # … and 30 synthetic participants + report
      pstudy demo --preset smoke --simulate 10 --serve-for 0   # the quick loop
      pstudy demo --data ~/photos --device cuda --preset paper
      pstudy demo --database-url postgresql+psycopg://postgres@127.0.0.1/pstudy
    """
    from study_app.commands import _secret_key, make_app

    paths = DemoPaths(out_dir.resolve())
    paths.root.mkdir(parents=True, exist_ok=True)
    database_url = database_url or f"sqlite:///{paths.database}"

    generate = pstudy_command("generate", "--preset", preset, "--out", str(paths.stimuli),
                              "--device", device)
    if data_dir:
        generate += ["--data", str(data_dir)]
    if threads:
        generate += ["--threads", str(threads)]
    run_step(f"1/5 generate the stimulus set ({preset} preset; reused when unchanged)",
             generate)

    click.secho("\n==> 2/5 create the study and the researcher account", bold=True, err=True)
    app = make_app(database_url)
    password = researcher_password(paths)
    owner_id = ensure_researcher(app, DEMO_RESEARCHER, password)
    slug = "demo-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    slug = create_demo_study(app, paths.stimuli, slug, votes_per_item, trials_per_participant,
                             owner_id)
    simulated_slug = None
    if n_simulated:
        # The synthetic participants get their own study, so the one behind the printed
        # participant link still has every trial open for a person to try.
        simulated_slug = create_demo_study(app, paths.stimuli, slug + "-simulated",
                                           votes_per_item, trials_per_participant, owner_id)
    # The web form may import from the demo's stimuli as well as the usual instance folder.
    stimulus_roots = os.environ.get("PSTUDY_STIMULUS_ROOTS") or json.dumps(
        [str(paths.stimuli), os.path.join(app.instance_path, "stimuli")])
    with app.app_context():
        from study_app.extensions import db

        db.engine.dispose()

    click.secho("\n==> 3/5 serve the app with gunicorn", bold=True, err=True)
    port = pick_port(host, port)
    base_url = f"http://{host}:{port}"
    env = dict(os.environ, DATABASE_URL=database_url, PSTUDY_STIMULUS_ROOTS=stimulus_roots,
               SECRET_KEY=os.environ.get("SECRET_KEY") or _secret_key(str(paths.instance)))
    server = subprocess.Popen(
        pstudy_command("serve", "--bind", f"{host}:{port}", "--workers", str(workers),
                       "--no-migrate"),
        env=env, start_new_session=True,
    )
    failure: click.ClickException | None = None
    try:
        wait_until_healthy(base_url, server, HEALTH_TIMEOUT_S)
        report = None
        if simulated_slug:
            try:
                report = simulate_export_analyse(paths, base_url, simulated_slug,
                                                 database_url, n_simulated)
            except click.ClickException as error:
                # The live study is fine: say what failed, keep serving, exit non-zero.
                failure = error
                click.secho(f"\n{error.format_message()}; the study is still served.",
                            fg="red", err=True)
        print_next_steps(base_url, slug, password, paths, database_url, simulated_slug, report)
        keep_serving(server, serve_for)
    except KeyboardInterrupt:
        click.echo("\nstopping…", err=True)
    finally:
        stop_server(server)
    click.echo("server stopped; run `make demo` again to start another study.", err=True)
    if failure is not None:
        raise failure


def simulate_export_analyse(paths: DemoPaths, base_url: str, slug: str, database_url: str,
                            participants: int) -> Path:
    """Steps 4 and 5: synthetic votes over HTTP, the export, and the analysis report."""
    run_step(f"4/5 {participants} synthetic participants vote over HTTP",
             pstudy_command("simulate", base_url, slug, "-n", str(participants), "-c", "10",
                            "--observer", "metric", "--noise", "0.01"))
    run_folder = paths.run_folder(slug)
    run_folder.mkdir(parents=True, exist_ok=True)
    responses = run_folder / "responses.parquet"
    env = dict(os.environ, DATABASE_URL=database_url)
    run_step("5/5 export the votes and analyse them",
             pstudy_command("export", slug, "-o", str(responses)), env=env)
    report_dir = run_folder / "report"
    run_step("5/5 analyse", pstudy_command("analyze", str(responses), "--out", str(report_dir),
                                           "--stimuli", str(paths.stimuli)))
    return report_dir


def print_next_steps(base_url: str, slug: str, password: str, paths: DemoPaths,
                     database_url: str, simulated_slug: str | None,
                     report: Path | None) -> None:
    """What the user can do now."""
    lines = [
        "",
        f"The study '{slug}' is live.",
        f"  participant link:  {base_url}/s/{slug}",
        f"  researcher login:  {base_url}/login",
        f"      email {DEMO_RESEARCHER}   password {password}",
        f"      (kept in {paths.password_file})",
        f"  stimulus set:      {paths.stimuli} (contact_sheet.png shows every condition)",
    ]
    if report is not None:
        lines += [
            f"  simulated study:   '{simulated_slug}', answered by synthetic participants",
            f"  analysis report:   {report / 'report.html'}"
            + (" (and report.pdf)" if (report / "report.pdf").is_file() else ""),
        ]
    lines += [
        "",
        "Next: open the participant link and vote, watch the dashboard, then export and",
        "analyse your votes:",
        f"  pstudy export {slug} -o responses.csv --database-url {database_url}",
        "  pstudy analyze responses.csv --out report/ --stimuli " + str(paths.stimuli),
    ]
    click.secho("\n".join(lines), fg="green")


def _interrupt(_signum, _frame) -> None:
    """Treat SIGTERM like Ctrl-C so the server is stopped the same way."""
    raise KeyboardInterrupt


def keep_serving(server: subprocess.Popen, serve_for: float | None) -> None:
    """Block until Ctrl-C/SIGTERM, ``serve_for`` seconds, or the server exits."""
    if serve_for is None:
        if not sys.stdin.isatty():
            click.echo("(standard input is not a terminal and no --serve-for was given: "
                       "stopping the server now)", err=True)
            return
        serve_for = float("inf")
    if serve_for == 0:
        return
    click.echo("serving — press Ctrl-C to stop", err=True)
    signal.signal(signal.SIGTERM, _interrupt)
    deadline = time.monotonic() + serve_for
    while time.monotonic() < deadline and server.poll() is None:
        time.sleep(0.5)
