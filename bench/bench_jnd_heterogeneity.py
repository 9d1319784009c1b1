"""The JND rate interval when the conditions are not alike: condition-specific random
effects, and one condition clustered far beyond the others.

    python bench/bench_jnd_heterogeneity.py [--studies 400] [--seed 0]

The report's ``jnd.different_rates`` pools the participants' and images' variance shares
over a study's conditions (``clustered.pooled_two_way_rates``). ``bench_inference.py
--outputs jnd_rates`` measures it when a participant's criterion and an image's masking
are shared by the conditions. Here, with the same design (20 participants x 10 images x
60 trials; four conditions at -1.5, -0.5, 0.5, 1.5 JOD and the identical pair at -2.5,
``simulation.simulate_jnd_responses``): (1) "specific": each condition its own,
independent participant (SD 0.5 JOD) and image (SD 0.4) effects; (2) the same with image
effects only; (3) "one wild": no random effects except an image SD of 1.2 JOD on q2 (its
rows from a second simulation of the same participants and images). Per design, the
coverage of the report's intervals and of each condition's own ``two_way_rate``, over
all rows and per condition, and how often a condition kept its own variance (the
guard). Truth: ``simulation.true_jnd_rates`` per condition.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

VISIBILITY = {"q1": -1.5, "q2": -0.5, "q3": 0.5, "q4": 1.5}
IDENTICAL_VISIBILITY = -2.5
WILD = "q2"
DESIGNS = {  # name: (participant SD, image SD, wild condition's image SD or None)
    "specific (0.5, 0.4)": (0.5, 0.4, None),
    "specific image 0.4": (0.0, 0.4, None),
    "one wild (q2 image 1.2)": (0.0, 0.0, 1.2),
}


def simulate(design: str, seed: int) -> tuple[pd.DataFrame, dict[str, float]]:
    """One JND study of ``design`` (export rows) and its population rates."""
    from analysis.jnd import IDENTICAL
    from analysis.simulation import simulate_jnd_responses, true_jnd_rates

    observer_sd, image_sd, wild = DESIGNS[design]
    common = {"identical": IDENTICAL_VISIBILITY, "shared": False}
    answers = simulate_jnd_responses(
        VISIBILITY, observer_sd=observer_sd, image_sd=image_sd, seed=seed, **common
    )
    truth = true_jnd_rates(
        {**VISIBILITY, IDENTICAL: IDENTICAL_VISIBILITY},
        observer_sd=observer_sd,
        image_sd=image_sd,
    )
    if wild is not None:
        other = simulate_jnd_responses(VISIBILITY, image_sd=wild, seed=seed + 1, **common)
        shown = ("condition_left", "condition_right")
        answers = pd.concat(
            [
                answers[~answers[list(shown)].eq(WILD).any(axis=1)],
                other[other[list(shown)].eq(WILD).any(axis=1)],
            ],
            ignore_index=True,
        )
        truth[WILD] = true_jnd_rates(VISIBILITY, image_sd=wild)[WILD]
    return answers, truth


def score(design: str, seed: int) -> list[dict]:
    """Per condition of one study: covered by the report's and by the own interval."""
    from analysis.clustered import two_way_rate
    from analysis.jnd import different_rates, jnd_trials

    answers, truth = simulate(design, seed)
    trials = jnd_trials(answers)
    table = different_rates(trials).set_index("condition")
    rows = []
    for condition, group in trials.groupby("condition", sort=True):
        own = two_way_rate(
            group["different"].to_numpy(float), group["participant"], group["image_id"]
        )
        report = table.loc[condition]
        rows.append(
            {
                "design": design,
                "condition": condition,
                "report": report["ci_low"] <= truth[condition] <= report["ci_high"],
                "own": own["ci_low"] <= truth[condition] <= own["ci_high"],
                "kept own": "pooled" not in report["interval"],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=400, help="per design")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.studies < 1:
        parser.error("--studies must be >= 1")
    start = time.perf_counter()
    rows = []
    for k, design in enumerate(DESIGNS):
        for index in range(args.studies):
            seed = int(np.random.SeedSequence([args.seed, k, index]).generate_state(1)[0])
            rows.extend(score(design, seed))
    frame = pd.DataFrame(rows)
    print(
        f"# JND rate intervals, conditions not alike: {args.studies} studies per design, seed {args.seed}"
    )
    print("| design | condition | report (pooled, guarded) | own two_way_rate | kept own |")
    print("| --- | --- | ---: | ---: | ---: |")
    for design, group in frame.groupby("design", sort=False):
        parts = [("all rows", group)] + list(group.groupby("condition", sort=True))
        for condition, part in parts:
            print(
                f"| {design} | {condition} | {part['report'].mean():.3f} | "
                f"{part['own'].mean():.3f} | {part['kept own'].mean():.3f} |"
            )
    print(f"\n{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
