"""The report's per-pair GLMM test (SDs pooled over the study's pairs) beside each pair's
own REML fit, in bench_glmm's designs, including few clusters.

    python bench/bench_glmm_pooled.py [--datasets 150] [--scenarios few-none,few-both,...]
                                      [--jobs 2] [--seed 70000]

Each simulated study has 5 equal conditions (10 pairs) with per-(participant, condition)
and per-(image, condition) random effects (``bench_glmm.SCENARIOS``: 20 participants x 10
images, or "few": 10 x 5; SDs in JOD). ``analysis.glmm.glmm_pair_tests`` is run with
``test="pooled"`` (the report's) and ``test="reml"`` (each pair's own SDs). Printed per
scenario and test: rejection at .05 and .01, the Holm family-wise error over the 10
pairs, and the coverage of the 95 % log-odds interval (truth 0), with Monte Carlo SEs.
docs/analysis.md quotes the numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

TESTS = ("pooled", "reml")


def one_study(args) -> list[dict]:
    """Both tests on one simulated study: per test, the share of the 10 pairs rejected at
    .05 and .01, whether Holm rejects any, and the share of intervals covering 0."""
    from bench_glmm import SCENARIOS

    from analysis.glmm import glmm_pair_tests
    from tests.glmm_support import simulate_crossed

    name, seed = args
    qualities, n_participants, n_images, trials, sd_p, sd_i = SCENARIOS[name]
    votes = simulate_crossed(
        qualities,
        n_participants,
        n_images,
        trials,
        participant_sd=sd_p,
        image_sd=sd_i,
        seed=seed,
    )
    out = []
    for test in TESTS:
        table = glmm_pair_tests(votes, with_ml=False, test=test)
        p = table["p"].fillna(1.0)
        out.append(
            {
                "scenario": name,
                "test": test,
                "reject05": float(np.mean(p < 0.05)),
                "reject01": float(np.mean(p < 0.01)),
                "fwe": float(table["p_holm"].min() < 0.05),
                "coverage": float(np.mean((table["ci_low"] <= 0) & (table["ci_high"] >= 0))),
            }
        )
    return out


def summarise(frame: pd.DataFrame) -> str:
    lines = [
        "| scenario | test | reject .05 | reject .01 | Holm FWE | 95 % interval coverage |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (scenario, test), group in frame.groupby(["scenario", "test"], sort=False):
        cells = []
        for column in ("reject05", "reject01", "fwe", "coverage"):
            values = group[column]
            mc = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else np.nan
            cells.append(f"{values.mean():.3f} ± {mc:.3f}")
        label = "report: SDs pooled over the pairs" if test == "pooled" else "own SDs per pair"
        lines.append(f"| {scenario} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from bench_glmm import SCENARIOS

    null = [name for name, spec in SCENARIOS.items() if len(set(spec[0].values())) == 1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=int, default=150)
    parser.add_argument("--scenarios", default=",".join(null), help="comma-separated (null ones)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=70_000)
    args = parser.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = sorted(set(scenarios) - set(null))
    if unknown or args.datasets < 2 or args.jobs < 1:
        parser.error(
            f"scenarios must be among {', '.join(null)} (got {', '.join(unknown)})"
            if unknown
            else "--datasets needs at least 2 and --jobs at least 1"
        )
    tasks = [(name, args.seed + d) for name in scenarios for d in range(args.datasets)]
    if args.jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(args.jobs) as pool:
            rows = [r for rs in pool.map(one_study, tasks, chunksize=4) for r in rs]
    else:
        rows = [r for task in tasks for r in one_study(task)]
    print(f"# {args.datasets} null studies per scenario, seed {args.seed}; mean ± MC SE")
    print(summarise(pd.DataFrame(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
