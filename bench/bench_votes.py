"""Vote endpoint vs a bare Flask endpoint, both under gunicorn with the same settings
(study_app/gunicorn.conf.py: 2 workers × 4 threads), 100 concurrent simulated
participants, on SQLite and on a throwaway PostgreSQL. Prints votes/s, p50/p99 latency
and the ratios.

    .venv/bin/python bench/bench_votes.py [--participants 100] [--votes 60] [--paced-votes 20]
                                          [--think-s 1]
    .venv/bin/python bench/bench_votes.py --next-latency [--conditions 16] [--images 500] [--think-s 1]
                                          [--rounds 5] [--participants 100]

Each participant first starts and leases all its trials (not timed), then two timed runs:

- saturated: all participants post their votes back-to-back at once — the throughput
  (votes/s) and its ratio to the bare endpoint; latency here is mostly queueing;
- paced: participants vote at a human pace (a think time uniform in 0.5–1.5 × --think-s
  before each vote, first votes spread over one think time) — the latency a participant
  sees while 100 others vote at the same time.

Load comes from 4 client processes × 25 threads on the same machine, identical for both
endpoints.

``--next-latency`` measures ``trials/next`` instead, for a balanced and an active study of
16 conditions (all 120 pairs) × 500 images = 60 000 items: the participants start (not
timed), then all fetch at once, answer their batch (not timed) and fetch again, --rounds
times (saturated: 100 fetches at once); then the same at a human pace (paced: a think
time uniform in 0.5–1.5 × --think-s before each answer, starts spread over one think
time; each participant fetches again when its batch is answered); with --arrival-s S a
third run (arrivals) has the same think time but participants arriving spread over S
seconds, as in a crowd study, where the first two runs start everyone within a second.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
GUNICORN_CONF = REPO / "study_app" / "gunicorn.conf.py"
CLIENT_PROCESSES = 4


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_postgres() -> tuple[str, callable, int]:
    """A throwaway PostgreSQL (as tests/conftest.py starts it, but durable: fsync on);
    returns (url, stop, postmaster pid)."""
    bindirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    if not bindirs:
        raise SystemExit("PostgreSQL is not installed (apt-get install postgresql)")
    bindir = Path(bindirs[-1])
    parent = Path(tempfile.mkdtemp(prefix="pstudy-bench-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(parent, "postgres", "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(parent / "data"), "-U",
                    "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"],
                   check=True, capture_output=True)
    options = (f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={parent} "
               "-c max_connections=300")
    subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(parent / "data"), "-o", options,
                    "-w", "-l", str(parent / "server.log"), "start"],
                   check=True, capture_output=True)

    def stop() -> None:
        subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(parent / "data"), "-m",
                        "immediate", "stop"], capture_output=True)
        shutil.rmtree(parent, ignore_errors=True)

    server_pid = int((parent / "data" / "postmaster.pid").read_text().split()[0])
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", stop, server_pid


def tree_cpu_seconds(roots: list[int]) -> float:
    """CPU seconds (user + system) used so far by the processes ``roots`` and all their
    live descendants (gunicorn master + workers, postmaster + backends), from /proc;
    0 for no roots (pid 0 stands for "none")."""
    roots = [pid for pid in roots if pid > 0]
    if not roots:
        return 0.0
    tick = os.sysconf("SC_CLK_TCK")
    parent_of, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        parent_of[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    total = 0.0
    for pid in cpu:
        ancestor = pid
        while ancestor > 1 and ancestor not in roots:
            ancestor = parent_of.get(ancestor, 1)
        if ancestor in roots:
            total += cpu[pid]
    return total


def make_study(database_url: str, root: Path, votes: int, participants: int) -> str:
    from study_app.commands import make_app
    from tests.study_support import make_study as make
    from tests.study_support import write_stimulus_set

    app = make_app(database_url)
    write_stimulus_set(root, n_images=20, conditions=("l1", "l2", "ssim", "deep"), seed=1)
    slug = make(app, root, slug="bench", votes_per_item=10**6, trials_per_participant=votes,
                catch_trials=0, repeat_trials=0, batch_size=votes, lease_seconds=3600,
                seed=7)
    with app.app_context():
        from study_app.extensions import db

        db.engine.dispose()
    return slug


def serve(app_spec: str, env: dict, cwd: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, **env, "PSTUDY_BIND": f"127.0.0.1:{port}", "PSTUDY_WORKERS": "2",
           "PSTUDY_THREADS": "4", "PSTUDY_LOG_LEVEL": "warning",
           "PSTUDY_PARTICIPANT_RATE_LIMIT": "[100000000, 60]", "PYTHONPATH": str(cwd)}
    process = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF),
                                app_spec], env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            requests.get(base + "/", timeout=2)
            return process, base
        except requests.RequestException:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"gunicorn ({app_spec}) did not start")


def vote_body(token: str, i: int) -> dict:
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"trial_token": token, "choice": "left" if i % 2 else "right", "rt_ms": 700.0,
            "presented_at": now, "answered_at": now, "viewport_w": 1280, "viewport_h": 800,
            "device_pixel_ratio": 1.0}


def _client_process(args: tuple) -> tuple[list[float], float, float, int]:
    """One client process: its participants in threads; (latencies ms, t0, t1, errors)."""
    base, url_path, jobs, start_at, think_s, seed = args
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    ends: list[float] = []

    def participant(job: tuple[dict, list[str]], rng: random.Random) -> None:
        headers, tokens = job
        session = requests.Session()
        mine = []
        if think_s:
            time.sleep(rng.uniform(0.0, think_s))
        for i, token in enumerate(tokens):
            if think_s and i:
                time.sleep(rng.uniform(0.5 * think_s, 1.5 * think_s))
            t = time.perf_counter()
            response = session.post(base + url_path, json=vote_body(token, i), headers=headers,
                                    timeout=30)
            mine.append((time.perf_counter() - t) * 1000)
            if response.status_code != 200:
                with lock:
                    errors[0] += 1
        with lock:
            latencies.extend(mine)
            ends.append(time.time())

    time.sleep(max(0.0, start_at - time.time()))
    threads = [threading.Thread(target=participant, args=(job, random.Random(seed * 1000 + j)))
               for j, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, start_at, max(ends), errors[0]


def load(base: str, url_path: str, jobs: list, think_s: float = 0.0, app_pid: int = 0,
         database_pid: int = 0) -> dict:
    """Post every job's votes (saturated when ``think_s`` is 0, else paced); also the CPU
    milliseconds per request of the app server's processes (gunicorn master + workers)
    and of the database server's (postmaster + backends; SQLite runs inside the app)."""
    cpu_before = [tree_cpu_seconds([pid]) for pid in (app_pid, database_pid)]
    start_at = time.time() + 1.0
    chunks = [jobs[i::CLIENT_PROCESSES] for i in range(CLIENT_PROCESSES)]
    with ProcessPoolExecutor(CLIENT_PROCESSES) as pool:
        results = list(pool.map(_client_process, [(base, url_path, c, start_at, think_s, i)
                                                  for i, c in enumerate(chunks)]))
    latencies = np.concatenate([np.array(r[0]) for r in results])
    wall = max(r[2] for r in results) - start_at
    app_ms, database_ms = ((tree_cpu_seconds([pid]) - before) * 1000 / len(latencies)
                           for pid, before in zip((app_pid, database_pid), cpu_before, strict=True))
    return {"requests": len(latencies), "errors": sum(r[3] for r in results),
            "app_cpu_ms": app_ms, "database_cpu_ms": database_ms,
            "per_s": len(latencies) / wall, "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99)), "wall_s": wall}


def participants_with_trials(base: str, slug: str, n: int) -> list:
    jobs = []
    for i in range(n):
        session = requests.Session()
        start = session.post(f"{base}/api/v1/studies/{slug}/participants",
                             json={"prolific_pid": f"bench-{i}"}, timeout=30).json()
        headers = {"Authorization": f"Bearer {start['participant']['token']}"}
        trials = session.post(f"{base}/api/v1/participant/trials/next", headers=headers,
                              timeout=30).json()["trials"]
        jobs.append((headers, [t["token"] for t in trials]))
    return jobs


@contextlib.contextmanager
def database_and_app(database: str, sqlite_path: Path, make):
    """A throwaway database ("sqlite" at ``sqlite_path`` or "postgres"), the study
    ``make(url)`` creates in it, and the app served on it by gunicorn; yields (slug, base
    URL, gunicorn pid, database server pid or 0); stops both afterwards."""
    stop, database_pid = None, 0
    if database == "postgres":
        url, stop, database_pid = start_postgres()
    else:
        url = f"sqlite:///{sqlite_path}"
    try:
        slug = make(url)
        process, base = serve("study_app:create_app()",
                              {"DATABASE_URL": url, "SECRET_KEY": "bench"}, REPO)
        try:
            yield slug, base, process.pid, database_pid
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    finally:
        if stop:
            stop()


def make_design_study(database_url: str, root: Path, design: str, conditions: int,
                      images: int, per_participant: int) -> str:
    """A study of ``conditions`` (all pairs) × ``images`` for the trials/next run."""
    from study_app.commands import make_app
    from tests.study_support import make_study as make
    from tests.study_support import write_stimulus_set

    app = make_app(database_url)
    write_stimulus_set(root, n_images=images, size=4, seed=1,
                       conditions=tuple(f"c{i:02d}" for i in range(conditions)))
    slug = make(app, root, slug=f"next-{design}", design=design, votes_per_item=3,
                trials_per_participant=per_participant, catch_trials=0, repeat_trials=0,
                batch_size=4, lease_seconds=3600, seed=7)
    with app.app_context():
        from study_app.extensions import db

        db.engine.dispose()
    return slug


def _next_client(args: tuple) -> tuple[list[float], int]:
    """One client process: its participants in threads, each fetching (timed) and
    answering its trials (not timed) ``rounds`` times; (latencies ms, errors)."""
    base, starts, rounds, start_at, think_s, arrival_s, seed = args
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def participant(headers: dict, rng: random.Random) -> None:
        session = requests.Session()
        mine = []
        if arrival_s:
            time.sleep(rng.uniform(0.0, arrival_s))
        for _ in range(rounds):
            t = time.perf_counter()
            response = session.post(f"{base}/api/v1/participant/trials/next", headers=headers,
                                    timeout=60)
            mine.append((time.perf_counter() - t) * 1000)
            if response.status_code != 200:
                with lock:
                    errors[0] += 1
                continue
            for i, trial in enumerate(response.json()["trials"]):
                if think_s:
                    time.sleep(rng.uniform(0.5 * think_s, 1.5 * think_s))
                session.post(f"{base}/api/v1/participant/votes", headers=headers,
                             json=vote_body(trial["token"], i), timeout=60)
        with lock:
            latencies.extend(mine)

    time.sleep(max(0.0, start_at - time.time()))
    threads = [threading.Thread(target=participant, args=(h, random.Random(f"{seed}:{i}")))
               for i, h in enumerate(starts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors[0]


def next_load(base: str, slug: str, participants: int, rounds: int, think_s: float = 0.0,
              tag: str = "next", arrival_s: float | None = None) -> dict:
    """``participants`` start (not timed), then fetch ``rounds`` times each: all at once
    (``think_s`` 0) or answering at a human pace (think time 0.5–1.5 × ``think_s``), the
    first fetches spread uniformly over ``arrival_s`` seconds (default: one think time)."""
    arrival_s = think_s if arrival_s is None else arrival_s
    starts = []
    for i in range(participants):
        start = requests.post(f"{base}/api/v1/studies/{slug}/participants",
                              json={"prolific_pid": f"{tag}-{i}"}, timeout=60).json()
        starts.append({"Authorization": f"Bearer {start['participant']['token']}"})
    start_at = time.time() + 1.0
    chunks = [starts[i::CLIENT_PROCESSES] for i in range(CLIENT_PROCESSES)]
    with ProcessPoolExecutor(CLIENT_PROCESSES) as pool:
        results = list(pool.map(_next_client, [(base, c, rounds, start_at, think_s, arrival_s,
                                                 i) for i, c in enumerate(chunks)]))
    latencies = np.concatenate([np.array(r[0]) for r in results])
    return {"requests": len(latencies), "errors": sum(r[1] for r in results),
            "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99))}


def next_latency(args, work: Path) -> None:
    """The trials/next run: balanced vs active, on each database (--next-latency)."""
    rows = []
    runs = [("saturated", 0.0, 0.0)]
    if args.think_s > 0:
        runs.append(("paced", args.think_s, args.think_s))
        if args.arrival_s > 0:  # arrivals spread as in a crowd study: the steady state
            runs.append(("arrivals", args.think_s, args.arrival_s))
    for database in args.databases.split(","):
        for design in ("balanced", "active"):
            with database_and_app(database, work / f"next-{design}.sqlite3",
                                  lambda url, d=design, db=database: make_design_study(
                                      url, work / f"set-{db}-{d}", d, args.conditions,
                                      args.images, 4 * args.rounds)) as (slug, base, _, _pid):
                for run, think_s, arrival_s in runs:  # new participants each run
                    rows.append((database, design, run,
                                 next_load(base, slug, args.participants, args.rounds,
                                           think_s, tag=run, arrival_s=arrival_s)))
    items = args.images * args.conditions * (args.conditions - 1) // 2
    print(f"trials/next: {args.participants} concurrent participants × {args.rounds} fetches "
          f"of 4 trials (each batch answered, not timed); {args.conditions} conditions × "
          f"{args.images} images = {items} items; gunicorn gthread 2 workers × 4 threads; "
          f"{os.cpu_count()} cores; paced: think {args.think_s:g} s ± 50% per trial, first "
          f"fetches within one think time; arrivals: the same think time, first fetches spread "
          f"over {args.arrival_s:g} s")
    print(f"{'database':<10}{'design':<10}{'run':<10}{'requests':>9}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'errors':>8}")
    for database, design, run, r in rows:
        print(f"{database:<10}{design:<10}{run:<10}{r['requests']:>9}{r['p50_ms']:>9.1f}"
              f"{r['p99_ms']:>9.1f}{r['errors']:>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--participants", type=int, default=100)
    parser.add_argument("--votes", type=int, default=60,
                        help="votes per participant in the saturated run")
    parser.add_argument("--paced-votes", type=int, default=20,
                        help="votes per participant in the paced run")
    parser.add_argument("--think-s", type=float, default=1.0,
                        help="mean think time of the paced run, seconds (0: skip it)")
    parser.add_argument("--databases", default="sqlite,postgres")
    parser.add_argument("--next-latency", action="store_true",
                        help="instead: trials/next latency of a balanced and an active study")
    parser.add_argument("--conditions", type=int, default=16, help="--next-latency: conditions")
    parser.add_argument("--images", type=int, default=500, help="--next-latency: images")
    parser.add_argument("--rounds", type=int, default=5,
                        help="--next-latency: fetches per participant")
    parser.add_argument("--arrival-s", type=float, default=0.0,
                        help="--next-latency: also a paced run whose participants arrive "
                        "spread over this many seconds (0: skip it)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pstudy-bench-"))
    if args.next_latency:
        next_latency(args, work)
        shutil.rmtree(work, ignore_errors=True)
        return
    modes = [("saturated", 0.0, args.votes)]
    if args.think_s > 0:
        modes.append(("paced", args.think_s, args.paced_votes))
    rows = []
    bare_process, bare_base = serve("bare_app:app", {}, REPO / "bench")
    try:
        for mode, think_s, votes in modes:
            bare_jobs = [({}, [f"token{i:04d}{j:04d}xxxxxxxxxxxx" for j in range(votes)])
                         for i in range(args.participants)]
            rows.append(("bare Flask", mode, load(bare_base, "/vote", bare_jobs, think_s,
                                                  bare_process.pid)))
    finally:
        bare_process.send_signal(signal.SIGTERM)
        bare_process.wait(timeout=30)
    for database in args.databases.split(","):
        with database_and_app(database, work / "bench.sqlite3",
                              lambda url, db=database: make_study(
                                  url, work / f"set-{db}", sum(m[2] for m in modes),
                                  args.participants)) as (slug, base, app_pid, database_pid):
            jobs = participants_with_trials(base, slug, args.participants)
            offset = 0
            for mode, think_s, votes in modes:
                run_jobs = [(headers, tokens[offset:offset + votes]) for headers, tokens in jobs]
                offset += votes
                rows.append((f"vote ({database})", mode,
                             load(base, "/api/v1/participant/votes", run_jobs, think_s,
                                  app_pid, database_pid)))
    shutil.rmtree(work, ignore_errors=True)
    print(f"{args.participants} concurrent participants; saturated: {args.votes} votes each "
          f"back-to-back; paced: {args.paced_votes} votes each, think {args.think_s:g} s ± 50%; "
          f"gunicorn gthread 2 workers × 4 threads; {os.cpu_count()} cores")
    print(f"{'endpoint':<20}{'run':<11}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
          f"{'CPU ms/req app':>16}{'db':>6}{'ratio req/s':>13}")
    bare = {mode: r for name, mode, r in rows if name == "bare Flask"}
    for name, mode, r in rows:
        ratio = f"{r['per_s'] / bare[mode]['per_s']:>13.2f}" if mode == "saturated" else ""
        print(f"{name:<20}{mode:<11}{r['per_s']:>9.1f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
              f"{r['errors']:>8}{r['app_cpu_ms']:>16.2f}{r['database_cpu_ms']:>6.2f}{ratio}")
    print(json.dumps({f"{name} {mode}": r for name, mode, r in rows}))


if __name__ == "__main__":
    main()
