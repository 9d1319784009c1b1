"""gunicorn settings for ``pstudy serve`` (each overridable by an environment variable).

Threaded workers (``gthread``): a vote spends most of its time waiting on the database,
so a few threads per process keep the CPU busy. The app is not preloaded: every worker
builds its own database engine after the fork (no connection is shared between
processes), and a worker that dies is replaced by the master without losing requests
other workers hold.
"""

import gc
import multiprocessing
import os

bind = os.environ.get("PSTUDY_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("PSTUDY_WORKERS", str(max(2, multiprocessing.cpu_count()))))
worker_class = "gthread"
threads = int(os.environ.get("PSTUDY_THREADS", "4"))
timeout = int(os.environ.get("PSTUDY_TIMEOUT", "30"))  # seconds a request may take
graceful_timeout = 10
keepalive = 5
backlog = 2048
preload_app = False
accesslog = os.environ.get("PSTUDY_ACCESS_LOG") or None  # "-" for stdout
errorlog = "-"
loglevel = os.environ.get("PSTUDY_LOG_LEVEL", "info")
proc_name = "pstudy"


def on_starting(server):
    """Import the active design's numerical core (numpy, scipy, pandas) once, in the
    master before it forks: workers inherit it loaded, so the first active study's first
    fetch does not wait seconds for the import. Pure modules: no connection is opened.
    An app served without the analysis package (e.g. bench/bare_app.py) skips it."""
    try:
        import analysis.active  # noqa: F401
    except ImportError:
        server.log.info("analysis not importable: the active design loads on first use")


def post_worker_init(worker):
    """Move every object the worker holds once the app is loaded (modules, numpy, scipy,
    SQLAlchemy's metadata: a few hundred thousand) to the garbage collector's permanent
    generation. A full collection then scans only what requests made since: measured on
    the trials/next bench (2 cores), 55–68 ms → 4–7 ms, a pause every thread of the worker
    waits out (docs/benchmarks.md, "Serving cost")."""
    gc.freeze()
