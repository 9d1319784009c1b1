"""Benchmark: the share-of-votes interval of one pair clustered beyond the others.

    python bench/bench_pair_heterogeneity.py [--studies 300] [--image-sd 0.8] [--observer-sd 0]

``analysis.clustered.two_way_rate_tests`` pools the participants' and images' variance
shares over a study's pairs. This checks the case pooling can get wrong: 5 equal
conditions, 20 participants × 10 images × 60 trials, no random effects except in pair
(a, b), whose votes come from a world with image effects SD ``--image-sd`` and participant
effects SD ``--observer-sd`` (JOD). Prints the coverage of the true rate 1/2 and the
rejection rate at .05 for pair (a, b): the report's rule (pooled, with its guard), the
pooled shares alone, and the pair's own two-way variance (``two_way_rate``); with
``--glmm`` the same three for the per-pair GLMM (``glmm_pair_tests``: its SDs pooled over
the pairs with the same guard, the guard off, and the pair's own SDs).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis import clustered  # noqa: E402
from analysis.pairs import ordered_pairs  # noqa: E402
from analysis.simulation import simulate_responses  # noqa: E402

QUALITIES = {c: 0.0 for c in "abcde"}


def _pair_ab(frame: pd.DataFrame) -> pd.Series:
    left, right = frame["condition_left"], frame["condition_right"]
    return ((left == "a") & (right == "b")) | ((left == "b") & (right == "a"))


def one_study(
    seed: int, image_sd: float, observer_sd: float, glmm: bool = False
) -> dict[str, tuple[bool, bool]]:
    """(covered, rejected) for pair (a, b) under each rule (with ``glmm``, also the GLMM's
    rules: its truth under these equal qualities is a log-odds of 0)."""
    calm = simulate_responses(QUALITIES, 20, 10, 60, seed=1000 + seed)
    wild = simulate_responses(
        QUALITIES, 20, 10, 60, image_sd=image_sd, observer_sd=observer_sd, seed=5000 + seed
    )
    main = pd.concat([calm[~_pair_ab(calm)], wild[_pair_ab(wild)]], ignore_index=True)
    out = {}
    row = clustered.two_way_rate_tests(main).set_index(["condition_a", "condition_b"])
    row = row.loc[("a", "b")]
    out["report (pooled, guarded)"] = (row.ci_low <= 0.5 <= row.ci_high, row.p_value < 0.05)
    z = clustered.HETEROGENEITY_Z
    clustered.HETEROGENEITY_Z = np.inf  # the guard off: the pooled shares alone
    try:
        row = clustered.two_way_rate_tests(main).set_index(["condition_a", "condition_b"])
        row = row.loc[("a", "b")]
    finally:
        clustered.HETEROGENEITY_Z = z
    out["pooled shares alone"] = (row.ci_low <= 0.5 <= row.ci_high, row.p_value < 0.05)
    votes = main[_pair_ab(main)]
    own = clustered.two_way_rate(
        ordered_pairs(votes)["win_a"].to_numpy(float), votes["participant"], votes["image_id"]
    )
    out["own pair (two_way_rate)"] = (own["ci_low"] <= 0.5 <= own["ci_high"], own["p_value"] < 0.05)
    if glmm:
        out.update(_glmm_rules(main))
    return out


def _glmm_rules(main: pd.DataFrame) -> dict[str, tuple[bool, bool]]:
    """Pair (a, b) in ``glmm_pair_tests``: the report's (SDs pooled over the pairs, own fit
    when beyond), the pooled SDs with the guard off, and the pair's own SDs."""
    from analysis.glmm import glmm_pair_tests

    def ab(test: str) -> tuple[bool, bool]:
        row = glmm_pair_tests(main, with_ml=False, test=test)
        row = row.set_index(["condition_a", "condition_b"]).loc[("a", "b")]
        return bool(row.ci_low <= 0.0 <= row.ci_high), bool(row.p < 0.05)

    out = {"GLMM report (pooled SDs, guarded)": ab("pooled")}
    z = clustered.HETEROGENEITY_Z
    clustered.HETEROGENEITY_Z = np.inf
    try:
        out["GLMM pooled SDs alone"] = ab("pooled")
    finally:
        clustered.HETEROGENEITY_Z = z
    out["GLMM own SDs (test=reml)"] = ab("reml")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=300)
    parser.add_argument("--image-sd", type=float, default=0.8)
    parser.add_argument("--observer-sd", type=float, default=0.0)
    parser.add_argument("--glmm", action="store_true", help="also the per-pair GLMM's rules")
    args = parser.parse_args(argv)
    if args.studies < 1 or args.image_sd < 0 or args.observer_sd < 0:
        parser.error("--studies must be >= 1 and the SDs >= 0")
    start = time.perf_counter()
    results = [
        one_study(s, args.image_sd, args.observer_sd, args.glmm) for s in range(args.studies)
    ]
    mc = np.sqrt(0.95 * 0.05 / args.studies)
    print(
        f"pair (a, b) with image SD {args.image_sd} and participant SD {args.observer_sd} JOD, "
        f"the other 9 pairs without; {args.studies} studies, {time.perf_counter() - start:.0f} s"
    )
    for rule in results[0]:
        covered = np.mean([r[rule][0] for r in results])
        rejected = np.mean([r[rule][1] for r in results])
        print(f"{rule:<34} coverage {covered:.3f} ± {mc:.3f}   rejection at .05 {rejected:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
