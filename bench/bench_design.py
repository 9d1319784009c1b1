"""Benchmark: votes needed to learn a condition scale, per pair-selection design.

    python bench/bench_design.py [--reps 200] [--conditions 8 16] [--workers 2]
                                 [--spread 2.4] [--json out.json] [--oracle-only]

Simulated observers with known true scales: per repetition, n conditions with true
qualities drawn uniformly on 0–2.4 JOD (the spread of the pwcmp tone-mapping example,
-1.37..1.04 JOD), 40 observers and 20 images with random effects (per observer ×
condition and per image × condition shifts; SD of a pair's difference 0.3 JOD each), as
``analysis.simulation.simulate_responses`` draws them. Votes come in batches of n - 1
(concurrent participants), each from a random observer. Designs:

- ``oracle`` (printed after the table): the A-optimal allocation of votes over pairs for
  the *known* true scale (``analysis.active.a_optimal_allocation``), as a ratio of the
  votes balanced needs for the same asymptotic precision: a first-order lower bound on
  what any adaptive design can save on these worlds;
- ``balanced``: every image × pair item once per round, rounds in a seeded random order
  (what the study server's lowest-load scheduling does);
- ``random``: a uniformly random pair and image per vote;
- ``asap``: ASAP-approx (Mikhailiuk et al. 2020, batch mode: minimum spanning tree),
  ``analysis.active.asap_approx_batch``; a random image per pair (ASAP knows no images);
- ``ours``: ``analysis.active.select_pairs`` (Thurstone Laplace posterior, expected
  reduction of the centred scale's variance, pair floor 2, batch shrunk jointly), the
  least-voted image of the chosen pair; ``ours-eig``: the same ranked by expected
  information gain (bits) instead.

After every batch the scale is fitted (Thurstone MAP, prior SD 3 JOD, the same for every
design). A repetition's *votes needed* is the first count where the mean-centred scale's
RMSE against the estimand (``analysis.simulation.population_scale``) is <= 0.2 JOD and
every pair of conditions more than 0.5 JOD apart is in the right order; runs that never
get there by the budget (60 votes per pair) count as the budget (reported as censored).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.active import (  # noqa: E402
    a_optimal_allocation,
    all_pairs,
    asap_approx_batch,
    select_pairs,
    thurstone_posterior,
)
from analysis.simulation import JOD_SIGMA, population_scale  # noqa: E402

DESIGNS = ("balanced", "random", "asap", "ours", "ours-eig")
SPREAD_JOD = 2.4
OBSERVERS = 40
IMAGES = 20
OBSERVER_SD = 0.3
IMAGE_SD = 0.3
RMSE_TARGET = 0.2
ORDER_GAP = 0.5
BUDGET_PER_PAIR = 60
PAIR_FLOOR = 2


def _world(size: int, rng: np.random.Generator, spread: float = SPREAD_JOD):
    quality = rng.uniform(0.0, spread, size)
    observer = rng.normal(0.0, OBSERVER_SD / np.sqrt(2.0), (OBSERVERS, size))
    image = rng.normal(0.0, IMAGE_SD / np.sqrt(2.0), (IMAGES, size))
    truth = population_scale(dict(enumerate(quality)), observer_sd=OBSERVER_SD, image_sd=IMAGE_SD)
    return quality, observer, image, truth


def _reached(estimate: np.ndarray, truth: np.ndarray, quality: np.ndarray) -> bool:
    centred = estimate - estimate.mean()
    if np.sqrt(np.mean((centred - truth) ** 2)) > RMSE_TARGET:
        return False
    gap = quality[:, None] - quality[None, :]
    far = gap > ORDER_GAP
    return bool(np.all((centred[:, None] - centred[None, :])[far] > 0))


def run_one(design: str, size: int, rep: int, spread: float = SPREAD_JOD) -> dict:
    """One simulated study; returns votes needed (or the budget) and coverage facts."""
    rng = np.random.default_rng([size, rep])  # the same world for every design
    quality, observer, image, truth = _world(size, rng, spread)
    rng = np.random.default_rng([size, rep, DESIGNS.index(design)])
    pairs = all_pairs(size)
    n_pairs = len(pairs)
    budget = BUDGET_PER_PAIR * n_pairs
    batch = size - 1
    item_votes = np.zeros((n_pairs, IMAGES), int)
    wins = np.zeros((size, size))
    winners: list[int] = []
    losers: list[int] = []
    queue: list[tuple[int, int]] = []  # balanced: (pair, image) items of the current round
    posterior = thurstone_posterior(wins)
    votes = 0
    while votes < budget:
        if design == "balanced":
            if len(queue) < batch:
                items = [(p, m) for p in range(n_pairs) for m in range(IMAGES)]
                queue += [items[k] for k in rng.permutation(len(items))]
            chosen, queue = queue[:batch], queue[batch:]
        elif design == "random":
            chosen = [
                (int(p), int(m))
                for p, m in zip(
                    rng.integers(0, n_pairs, batch), rng.integers(0, IMAGES, batch), strict=True
                )
            ]
        elif design == "asap":
            index = {(int(a), int(b)): k for k, (a, b) in enumerate(pairs)}
            picks = asap_approx_batch(np.array(winners, int), np.array(losers, int), size)
            chosen = [(index[(c.i, c.j)], int(rng.integers(IMAGES))) for c in picks]
        else:
            index = {(int(a), int(b)): k for k, (a, b) in enumerate(pairs)}
            picks = select_pairs(
                posterior,
                batch,
                counts=item_votes.sum(axis=1),
                pair_floor=PAIR_FLOOR,
                seed=f"{size}:{rep}:{votes}",
                criterion="entropy" if design == "ours-eig" else "variance",
            )
            chosen = []
            for c in picks:
                k = index[(c.i, c.j)]
                row = item_votes[k]
                least = np.flatnonzero(row == row.min())
                chosen.append((k, int(rng.choice(least))))
                item_votes[k, chosen[-1][1]] += 1  # reserve: the next pick sees it
            for k, m in chosen:
                item_votes[k, m] -= 1
        for k, m in chosen:
            a, b = pairs[k]
            who = rng.integers(OBSERVERS)
            diff = (
                quality[a]
                - quality[b]
                + observer[who, a]
                - observer[who, b]
                + image[m, a]
                - image[m, b]
            )
            a_wins = rng.random() < _phi(diff / JOD_SIGMA)
            w, lo = (a, b) if a_wins else (b, a)
            wins[w, lo] += 1
            winners.append(int(w))
            losers.append(int(lo))
            item_votes[k, m] += 1
        votes += len(chosen)
        posterior = thurstone_posterior(wins, initial=posterior.mean)
        if _reached(posterior.mean, truth, quality):
            break
    pair_votes = item_votes.sum(axis=1)
    return {
        "design": design,
        "conditions": size,
        "rep": rep,
        "votes": votes,
        "censored": votes >= budget,
        "min_pair_votes": int(pair_votes.min()),
        "max_pair_share": float(pair_votes.max() / max(votes, 1)),
    }


def _phi(x: float) -> float:
    from math import erf, sqrt

    return 0.5 * (1.0 + erf(x / sqrt(2.0)))


def _task(args):
    return run_one(*args)


def oracle_ratio(size: int, rep: int, spread: float = SPREAD_JOD) -> float:
    """The A-optimal design's votes relative to balanced's for repetition ``rep``'s world
    (``analysis.active.a_optimal_allocation`` at the true population scale, its certified
    lower bound): to first order, no design needs fewer votes on that world."""
    rng = np.random.default_rng([size, rep])  # the same world as run_one's
    _, _, _, truth = _world(size, rng, spread)
    return a_optimal_allocation(truth).lower_bound


def _oracle_task(args):
    return oracle_ratio(*args)


def summarise(rows: list[dict]) -> list[dict]:
    """Per (conditions, design): median / mean / quartiles of votes needed, ratios."""
    out = []
    for size in sorted({r["conditions"] for r in rows}):
        base = None
        for design in DESIGNS:
            sel = [r for r in rows if r["conditions"] == size and r["design"] == design]
            if not sel:
                continue
            votes = np.array([r["votes"] for r in sel], float)
            entry = {
                "conditions": size,
                "design": design,
                "reps": len(sel),
                "median": float(np.median(votes)),
                "mean": float(votes.mean()),
                "q25": float(np.percentile(votes, 25)),
                "q75": float(np.percentile(votes, 75)),
                "censored": int(sum(r["censored"] for r in sel)),
                "min_pair_votes": int(min(r["min_pair_votes"] for r in sel)),
                "max_pair_share": float(max(r["max_pair_share"] for r in sel)),
            }
            if design == "balanced":
                base = entry["mean"]
            entry["ratio_to_balanced"] = entry["mean"] / base if base else float("nan")
            out.append(entry)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200, help="repetitions per design and size")
    parser.add_argument("--conditions", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=DESIGNS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--spread",
        type=float,
        default=SPREAD_JOD,
        help="true qualities uniform on 0..SPREAD JOD (default %(default)s)",
    )
    parser.add_argument("--json", type=Path, help="write every repetition's result here")
    parser.add_argument(
        "--oracle-only", action="store_true", help="only the oracle bound (no design is run)"
    )
    args = parser.parse_args(argv)
    if args.reps < 1 or any(c < 3 for c in args.conditions):
        parser.error("--reps must be >= 1 and every --conditions value >= 3")
    tasks = [
        (d, c, r, args.spread)
        for c in args.conditions
        for d in ([] if args.oracle_only else args.designs)
        for r in range(args.reps)
    ]
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        rows = list(pool.map(_task, tasks, chunksize=4))
        worlds = [(c, r, args.spread) for c in args.conditions for r in range(args.reps)]
        oracle = np.array(list(pool.map(_oracle_task, worlds, chunksize=4)))
    elapsed = time.perf_counter() - start
    summary = summarise(rows)
    print(
        f"{args.reps} repetitions per design and size, spread {args.spread} JOD, "
        f"{elapsed:.0f} s, {args.workers} workers"
    )
    print(
        f"{'n':>3} {'design':<9} {'median':>7} {'mean':>7} {'IQR':>12} {'×bal':>5} "
        f"{'cens.':>5} {'min/pair':>8} {'max share':>9}"
    )
    for e in summary:
        print(
            f"{e['conditions']:>3} {e['design']:<9} {e['median']:>7.0f} {e['mean']:>7.0f} "
            f"{e['q25']:>5.0f}–{e['q75']:<6.0f} {e['ratio_to_balanced']:>5.2f} "
            f"{e['censored']:>5} {e['min_pair_votes']:>8} {e['max_pair_share']:>9.3f}"
        )
    print(
        "oracle: the A-optimal allocation for the known scale, votes relative to balanced "
        "for the same precision (asymptotic; no design can do better to first order)"
    )
    oracle_rows = []
    for k, size in enumerate(args.conditions):
        ratios = oracle[k * args.reps : (k + 1) * args.reps]
        oracle_rows.append(
            {
                "conditions": size,
                "mean_ratio": float(ratios.mean()),
                "min_ratio": float(ratios.min()),
                "max_ratio": float(ratios.max()),
            }
        )
        print(
            f"{size:>3} oracle    ×bal mean {ratios.mean():.2f} "
            f"(range {ratios.min():.2f}–{ratios.max():.2f} over {args.reps} worlds)"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"summary": summary, "oracle": oracle_rows, "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
