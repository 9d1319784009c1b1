"""Synthetic participants through the real HTTP API: load tests, demos, power checks.

Each simulated participant does what a browser does: start (with a Prolific id, so a
retried start resumes), fetch trials, vote, finish. Every request is retried with
backoff on connection errors, timeouts and 5xx (votes are idempotent by trial token), so
a participant survives server restarts. Observers:

- ``random``: left or right with probability 1/2;
- ``one-side``: always the same side (a careless participant; tests side-bias rules);
- ``metric``: a Thurstone-like observer that downloads the three images, computes the
  RMSE of each candidate to the reference (pixels in [0, 1]) and picks the candidate
  with the smaller ``rmse + N(0, noise²)`` (reference mode only).

In a JND study (same or different?) the same observers answer "same" / "different":
``random`` either with probability 1/2, ``one-side`` always the answer on its side (left =
same), ``metric`` "different" when the RMSE between the two images shown plus
N(0, noise²) exceeds ``JND_RMSE`` (so a catch trial, the reference twice, is "same"
unless the noise says otherwise).
"""

from __future__ import annotations

import io
import math
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
import requests

OBSERVERS = ("random", "one-side", "metric")
JND_RMSE = 0.03  # the metric observer's JND threshold: RMSE in [0, 1] pixel units
RETRYABLE_STATUS = {429, 500, 502, 503, 504}


class SimulationError(RuntimeError):
    """The server refused a simulated participant in a way retries cannot fix."""


@dataclass
class Acknowledged:
    """A vote the server acknowledged (200)."""

    participant: str  # the participant's anonymous id
    trial_token: str
    choice: str
    latency_ms: float


@dataclass
class SimulationResult:
    participants: int = 0
    completed: int = 0
    votes: list[Acknowledged] = field(default_factory=list)
    retries: int = 0
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def latencies_ms(self) -> np.ndarray:
        return np.array([v.latency_ms for v in self.votes], dtype=float)


class Client:
    """HTTP with retries; one per simulated participant (own connection pool)."""

    def __init__(self, base_url: str, timeout_s: float = 10.0, max_retries: int = 30):
        self.base_url = base_url.rstrip("/")
        self.session = requests.Session()
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.retries = 0

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        delay = 0.05
        for attempt in range(self.max_retries + 1):
            try:
                response = self.session.request(method, self.base_url + path,
                                                timeout=self.timeout_s, **kwargs)
                if response.status_code not in RETRYABLE_STATUS:
                    return response
            except requests.RequestException:  # reset, timeout, truncated body
                self.session.close()  # drop a connection the server may have killed
                self.session = requests.Session()
            if attempt == self.max_retries:
                break
            self.retries += 1
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 1.0)
        raise SimulationError(f"{method} {path}: no answer after {self.max_retries} retries")


Observer = Callable[[dict, "Client"], str]


def random_observer(rng: random.Random) -> Observer:
    return lambda trial, client: rng.choice(("left", "right"))


def one_side_observer(side: str = "left") -> Observer:
    return lambda trial, client: side


def _image(client: Client, url: str, cache: dict[str, np.ndarray]) -> np.ndarray:
    if url not in cache:
        from PIL import Image

        response = client.request("GET", url)
        response.raise_for_status()
        with Image.open(io.BytesIO(response.content)) as img:
            cache[url] = np.asarray(img.convert("RGB"), dtype=float) / 255.0
    return cache[url]


def metric_observer(rng: random.Random, noise: float = 0.02,
                    cache: dict[str, np.ndarray] | None = None) -> Observer:
    """Choose the candidate with the lower RMSE to the reference, plus N(0, noise²)."""
    cache = {} if cache is None else cache

    def observe(trial: dict, client: Client) -> str:
        if trial.get("reference_url") is None:
            raise SimulationError("the metric observer needs a study with a reference image")
        reference = _image(client, trial["reference_url"], cache)
        scores = {}
        for side in ("left", "right"):
            candidate = _image(client, trial[f"{side}_url"], cache)
            rmse = float(np.sqrt(np.mean((candidate - reference) ** 2)))
            scores[side] = rmse + rng.gauss(0.0, noise)
        return "left" if scores["left"] <= scores["right"] else "right"

    return observe


def jnd_observer(name: str, rng: random.Random, noise: float = 0.02, side: str = "left",
                 cache: dict[str, np.ndarray] | None = None) -> Observer:
    """An observer of a JND study: answers "same" or "different" (module docstring)."""
    cache = {} if cache is None else cache
    if name == "random":
        return lambda trial, client: rng.choice(("same", "different"))
    if name == "one-side":
        return lambda trial, client: "same" if side == "left" else "different"
    if name != "metric":
        raise ValueError(f"observer must be one of {OBSERVERS}, not {name!r}")

    def observe(trial: dict, client: Client) -> str:
        first = _image(client, trial["left_url"], cache)
        second = _image(client, trial["right_url"], cache)
        rmse = float(np.sqrt(np.mean((first - second) ** 2)))
        return "different" if rmse + rng.gauss(0.0, noise) > JND_RMSE else "same"

    return observe


def make_observer(name: str, rng: random.Random, noise: float = 0.02, side: str = "left",
                  cache: dict | None = None, task: str = "2afc") -> Observer:
    """The observer ``name`` for a study of ``task`` ("2afc" or "jnd")."""
    if task == "jnd":
        return jnd_observer(name, rng, noise, side, cache)
    if name == "random":
        return random_observer(rng)
    if name == "one-side":
        return one_side_observer(side)
    if name == "metric":
        return metric_observer(rng, noise, cache)
    raise ValueError(f"observer must be one of {OBSERVERS}, not {name!r}")


def _vote_body(token: str, choice: str, rng: random.Random) -> dict:
    rt_ms = round(rng.lognormvariate(6.7, 0.4), 1)  # ~800 ms median
    shown = datetime.now(UTC)
    return {
        "trial_token": token, "choice": choice, "rt_ms": rt_ms,
        "presented_at": shown.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "answered_at": (shown + timedelta(milliseconds=rt_ms)).isoformat(
            timespec="milliseconds").replace("+00:00", "Z"),
        "viewport_w": 1280, "viewport_h": 800, "device_pixel_ratio": 1.0,
    }


# The synthetic participants' display: the 1280 × 800 window at devicePixelRatio 1 their
# votes report, on a 1920 × 1080 screen at 96 dpi (3.78 CSS px/mm), seen from 60 cm.
SIM_PX_PER_MM = 96 / 25.4
SIM_DISTANCE_MM = 600.0


def synthetic_display(calibration: dict) -> dict:
    """A display report (POST /participant/display) that fits a study's ``calibration``
    settings: the card step unless it is off, the blind spot (13.5° at SIM_DISTANCE_MM)
    unless that is off; 39.6 CSS px per degree."""
    body = {"device_pixel_ratio": 1.0, "screen_w": 1920, "screen_h": 1080,
            "zoom_estimate": 1.0}
    if calibration.get("mode", "off") != "off":
        body["card_width_px"] = round(85.6 * SIM_PX_PER_MM, 3)
        if calibration.get("viewing_distance", "optional") != "off":
            body["blind_spot_px"] = round(
                SIM_DISTANCE_MM * math.tan(math.radians(13.5)) * SIM_PX_PER_MM, 3)
    return body


def _check_display(client: Client, slug: str, headers: dict) -> None:
    """Report the synthetic display when the study wants one before the trials."""
    study = client.request("GET", f"/api/v1/studies/{slug}").json()["study"]
    response = client.request("POST", "/api/v1/participant/display", headers=headers,
                              json=synthetic_display(study.get("calibration") or {}))
    verdict = response.json().get("display") if response.status_code == 200 else None
    if not verdict or not verdict["passed"]:
        raise SimulationError(f"display check refused: {response.status_code} {response.text}")


def run_participant(base_url: str, slug: str, pid: str, observer: Observer,
                    rng: random.Random, result: SimulationResult, lock: threading.Lock,
                    idle_polls: int = 40, fetch_images: bool = False) -> bool:
    """One synthetic participant from start to finish; True when it completed."""
    client = Client(base_url)
    try:
        response = client.request("POST", f"/api/v1/studies/{slug}/participants",
                                  json={"prolific_pid": pid})
        if response.status_code not in (200, 201):
            raise SimulationError(f"start refused: {response.status_code} {response.text}")
        participant = response.json()["participant"]
        headers = {"Authorization": f"Bearer {participant['token']}"}
        idle = 0
        while True:
            response = client.request("POST", "/api/v1/participant/trials/next",
                                      headers=headers)
            if response.status_code == 409 and "display_check_needed" in response.text:
                _check_display(client, slug, headers)
                continue
            if response.status_code != 200:
                raise SimulationError(f"next refused: {response.status_code} {response.text}")
            body = response.json()
            if body["done"]:
                break
            if not body["trials"]:
                idle += 1
                if idle > idle_polls:
                    client.request("POST", "/api/v1/participant/finish", headers=headers,
                                   json={"status": "returned"})
                    return False
                time.sleep(0.25)
                continue
            idle = 0
            for trial in body["trials"]:
                if fetch_images:
                    for key in ("reference_url", "left_url", "right_url"):
                        if trial.get(key):
                            client.request("GET", trial[key])
                choice = observer(trial, client)
                started = time.perf_counter()
                response = client.request("POST", "/api/v1/participant/votes",
                                          headers=headers,
                                          json=_vote_body(trial["token"], choice, rng))
                latency_ms = (time.perf_counter() - started) * 1000.0
                if response.status_code == 410:  # lease expired: fetch again
                    continue
                if response.status_code != 200:
                    raise SimulationError(
                        f"vote refused: {response.status_code} {response.text}")
                with lock:
                    result.votes.append(Acknowledged(participant["id"], trial["token"],
                                                     response.json()["vote"]["choice"],
                                                     latency_ms))
        response = client.request("POST", "/api/v1/participant/finish", headers=headers,
                                  json={"status": "completed"})
        if response.status_code != 200:
            raise SimulationError(f"finish refused: {response.status_code} {response.text}")
        return True
    finally:
        with lock:
            result.retries += client.retries
        client.session.close()


def run_simulation(base_url: str, slug: str, participants: int = 100, concurrency: int = 100,
                   observer: str = "random", noise: float = 0.02, side: str = "left",
                   seed: int = 0, fetch_images: bool = False, progress: bool = True,
                   pid_prefix: str | None = None) -> SimulationResult:
    """Run ``participants`` synthetic participants, ``concurrency`` at a time."""
    from tqdm import tqdm

    result = SimulationResult(participants=participants)
    lock = threading.Lock()
    cache: dict[str, np.ndarray] = {}
    prefix = pid_prefix or f"sim{seed}"
    study = Client(base_url).request("GET", f"/api/v1/studies/{slug}")
    if study.status_code != 200:
        raise SimulationError(f"study {slug!r}: {study.status_code} {study.text}")
    task = study.json()["study"].get("task", "2afc")
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, participants))) as pool:
        futures = []
        for i in range(participants):
            rng = random.Random(f"{seed}:{i}")
            futures.append(pool.submit(
                run_participant, base_url, slug, f"{prefix}-{i}",
                make_observer(observer, rng, noise, side, cache, task), rng, result, lock,
                fetch_images=fetch_images,
            ))
        for future in tqdm(as_completed(futures), total=participants, disable=not progress,
                           desc="participants", unit="p"):
            try:
                result.completed += 1 if future.result() else 0
            except SimulationError as error:
                result.errors.append(str(error))
    result.wall_s = time.perf_counter() - started
    return result
