"""Why the metric-agreement interval over-covers in two null scenarios: the parts of
``clustered.two_way_rate`` on the per-vote agreement, study by study.

    python bench/bench_agreement_null.py [--studies 200] [--seed 0]

Same studies and simulated metrics as ``bench_inference.py --outputs metric_agreement``
(its ``make_study`` and ``simulated_metrics``, same seeds). Per scenario x truth, over
all intervals (3 metrics per study): coverage of the report's interval; the share where
the floor binds (V_participants + V_images - V_cells <= V_cells, so V = V_cells with
cells - 1 df) and the coverage on each side of it; the median Satterthwaite df where it
does not bind; the coverage of the same variance with a normal quantile, and of V_cells
alone with a normal quantile, and of V_p + V_i - V_c without the floor (Satterthwaite t;
V_cells where it is not positive); the mean of V over the variance of the score across
studies (per metric, then averaged; 1 = unbiased); and the df that the spread of
V_p + V_i - V_c across studies implies (2 mean^2 / variance; comparable with the
Satterthwaite df only where the true variance is the same in every study: the nulls).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402


def _harness():
    spec = importlib.util.spec_from_file_location(
        "bench_inference", ROOT / "bench" / "bench_inference.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_inference", module)
    spec.loader.exec_module(module)
    return module


def metric_agreements(study, harness):
    """Per simulated metric of ``study`` (``harness.simulated_metrics``): (metric, the
    per-vote agreement with its main trials in order (1, 0, ½ on a tie), its truth)."""
    from analysis.pairs import ordered_pairs

    distances, truth = harness.simulated_metrics(study)
    main = study.main
    pairs = ordered_pairs(main)
    win_a = pairs["win_a"].to_numpy(dtype=float)
    for metric, dist in distances.groupby("metric", sort=False):
        lookup = dist.set_index(["image_id", "condition"])["distance"]
        da, db = (
            lookup.reindex(pd.MultiIndex.from_arrays([main["image_id"], pairs[c]])).to_numpy()
            for c in ("condition_a", "condition_b")
        )
        prefers_a = np.where(da < db, 1.0, np.where(da > db, 0.0, 0.5))
        yield metric, prefers_a * win_a + (1 - prefers_a) * (1 - win_a), truth[metric]


def agreement_parts(study, harness) -> list[dict]:
    """Per simulated metric of ``study``: the score, its truth, the one-way parts and the
    report's interval (``two_way_rate`` of the per-vote agreement)."""
    from analysis.clustered import _rate_components, two_way_rate

    main = study.main
    rows = []
    for metric, agree, target in metric_agreements(study, harness):
        rate, parts, clusters = _rate_components(agree, main["participant"], main["image_id"])
        result = two_way_rate(agree, main["participant"], main["image_id"])
        rows.append(
            {
                "metric": metric,
                "rate": rate,
                "truth": target,
                "covered": result["ci_low"] <= target <= result["ci_high"],
                "var": result["se"] ** 2,
                "df": result["df"],
                "v_participant": parts["participant"],
                "v_image": parts["image"],
                "v_cell": parts["cell"],
                **{f"g_{k}": clusters[k] for k in ("participant", "image", "cell")},
            }
        )
    return rows


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (truth, scenario): the diagnostics of the module docstring."""
    out = []
    for (truth, scenario), g in frame.groupby(["truth_kind", "scenario"], sort=False):
        two_way = g["v_participant"] + g["v_image"] - g["v_cell"]
        floored = two_way <= g["v_cell"]
        miss = (g["rate"] - g["truth"]).abs()
        # no floor: V_p + V_i - V_c (V_c where not positive), Satterthwaite df as the rule's
        spread = sum(g[f"v_{k}"] ** 2 / (g[f"g_{k}"] - 1) for k in ("participant", "image", "cell"))
        unfloored = np.where(two_way > 0, two_way, g["v_cell"])
        df = np.minimum(
            unfloored**2 / spread, sum(g[f"g_{k}"] - 1 for k in ("participant", "image", "cell"))
        )
        no_floor = miss <= stats.t.isf(0.025, df) * np.sqrt(unfloored)
        by_metric = g.groupby("metric")
        out.append(
            {
                "truth": truth,
                "scenario": scenario,
                "coverage": g["covered"].mean(),
                "floor binds": floored.mean(),
                "coverage, floor binds": g.loc[floored, "covered"].mean(),
                "coverage, two-way": g.loc[~floored, "covered"].mean(),
                "median df, two-way": g.loc[~floored, "df"].median(),
                "no floor, Satterthwaite t": no_floor.mean(),
                "same V, normal": (miss <= 1.96 * np.sqrt(g["var"])).mean(),
                "V_cells, normal": (miss <= 1.96 * np.sqrt(g["v_cell"])).mean(),
                "mean V / var(score)": (by_metric["var"].mean() / by_metric["rate"].var()).mean(),
                "df from spread": float(
                    np.mean(
                        [
                            2 * np.mean(t) ** 2 / np.var(t, ddof=1)
                            for _, t in two_way.groupby(g["metric"])
                        ]
                    )
                ),
            }
        )
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=200, help="per scenario and truth")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.studies < 2:
        parser.error("--studies must be >= 2 (the variance of the score across studies)")
    harness = _harness()
    start = time.perf_counter()
    rows = []
    for scenario in harness.SCENARIOS:
        for truth in harness.TRUTHS:
            for index in range(args.studies):
                seed = harness.study_seed(args.seed, scenario, truth, index)
                task = harness.Task(
                    scenario, truth, index, seed, "thurstone", 10, (), ("two-way",), False
                )
                study = harness.make_study(task)
                for row in agreement_parts(study, harness):
                    rows.append({"scenario": scenario, "truth_kind": truth, **row})
    table = summarise(pd.DataFrame(rows))
    print(
        f"# metric agreement, parts of the two-way interval: {args.studies} studies per "
        f"scenario x truth, seed {args.seed}; machine: {harness.machine()}"
    )
    columns = list(table.columns)
    print("| " + " | ".join(columns) + " |")
    print("| " + " | ".join("---" for _ in columns) + " |")
    for row in table.itertuples(index=False):
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in row]
        print("| " + " | ".join(cells) + " |")
    print(f"\n{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
