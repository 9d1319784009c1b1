"""Calibration and speed of the per-pair GLMM test (analysis.glmm), by simulation.

    python bench/bench_glmm.py [--datasets 300] [--scenarios none,participant,...]
                               [--csv per_pair.csv] [--reml] [--lrt] [--seed 0]
    python bench/bench_glmm.py --summarize --csv per_pair.csv

Each simulated study has 5 conditions (10 pairs) and per-(participant, condition) and
per-(image, condition) random effects (tests/glmm_support.simulate_crossed; SDs in JOD).
Every pair is fitted like ``glmm_pair_tests`` does (win_a ~ 1 + a_left + (1|participant) +
(1|image)) by Laplace ML (= lme4's glmer) and, with --reml, by REML, and its intercept
tested against 0 several ways: Wald z; Wald t with Satterthwaite df, with G - 1 df (G the
fewest levels among the factors whose SD is not 0), and with Satterthwaite df floored at
G - 1; the same on the REML fit ("REML Wald t, Satterthwaite df >= G-1 (default)" is what
the report uses); with --lrt the likelihood-ratio test (a second fit without the
intercept). Printed: rejection rate of single tests at alpha .05 and .01 and the Holm
family-wise error over the 10 pairs, with Monte Carlo standard errors; under "power"
(one condition 0.8 JOD better) the share of its 4 pairs rejected. Also the CPU time per
fit. docs/analysis.md quotes the numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

EQUAL = {"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.0, "e": 0.0}
# name: (qualities, participants, images, trials per participant, participant SD, image SD)
SCENARIOS = {
    "none": (EQUAL, 20, 10, 60, 0.0, 0.0),
    "participant": (EQUAL, 20, 10, 60, 0.5, 0.0),
    "image": (EQUAL, 20, 10, 60, 0.0, 0.4),
    "both": (EQUAL, 20, 10, 60, 0.5, 0.4),
    "few-none": (EQUAL, 10, 5, 60, 0.0, 0.0),
    "few-participant": (EQUAL, 10, 5, 60, 0.5, 0.0),
    "few-image": (EQUAL, 10, 5, 60, 0.0, 0.4),
    "few-both": (EQUAL, 10, 5, 60, 0.5, 0.4),
    "power": ({**EQUAL, "e": 0.8}, 20, 10, 60, 0.5, 0.4),
    "few-power": ({**EQUAL, "e": 0.8}, 10, 5, 60, 0.5, 0.4),
}


def fit_pairs(votes: pd.DataFrame, lrt: bool, reml: bool = False) -> list[dict]:
    from analysis.clustered import _pair_frame, _side_term_estimable
    from analysis.glmm import fit_glmm

    frame = _pair_frame(votes, sides_recorded=True)
    out = []
    for (a, b), group in frame.groupby(["condition_a", "condition_b"], sort=True):
        y = group["win_a"].to_numpy(dtype=float)
        record = {"condition_a": a, "condition_b": b, "n_votes": len(group)}
        record["n_participants"] = group["participant"].nunique()
        record["n_images"] = group["image_id"].nunique()
        if y.min() == y.max() or record["n_images"] < 2:
            out.append(record)
            continue
        columns = [np.ones(len(group))]
        if _side_term_estimable(group["a_left"], y):
            columns.append(group["a_left"].to_numpy(dtype=float))
        X = np.column_stack(columns)
        groups = [group["participant"].to_numpy(), group["image_id"].to_numpy()]
        start = time.process_time()
        fit = fit_glmm(y, X, groups)
        record["cpu_s"] = time.process_time() - start
        record.update(
            est=fit.beta[0],
            se=fit.se[0],
            se_conditional=fit.se_conditional[0],
            df_satterthwaite=fit.df[0],
            sd_participant=fit.sd[0],
            sd_image=fit.sd[1],
            boundary_participant=fit.boundary[0],
            boundary_image=fit.boundary[1],
            converged=fit.converged,
        )
        if reml:
            start = time.process_time()
            restricted = fit_glmm(y, X, groups, reml=True)
            record["cpu_reml_s"] = time.process_time() - start
            record.update(
                est_reml=restricted.beta[0],
                se_reml=restricted.se[0],
                df_reml=restricted.df[0],
                df_components_reml=restricted.df_components[0],
                sd_participant_reml=restricted.sd[0],
                sd_image_reml=restricted.sd[1],
                converged_reml=restricted.converged,
            )
        if lrt:
            if X.shape[1] > 1:
                null = fit_glmm(y, X[:, 1:], groups)
                record["lrt"] = max(null.deviance - fit.deviance, 0.0)
            else:
                record["lrt"] = np.nan  # the null model would have no fixed effect
        out.append(record)
    return out


def p_values(table: pd.DataFrame) -> dict[str, np.ndarray]:
    z = (table["est"] / table["se"]).abs().to_numpy()
    out = {"Wald z": 2 * stats.norm.sf(z)}
    df = table["df_satterthwaite"].to_numpy(dtype=float)
    out["Wald t, Satterthwaite df"] = np.where(
        np.isfinite(df), 2 * stats.t.sf(z, np.where(np.isfinite(df), df, 1)), out["Wald z"]
    )
    g = np.minimum(
        np.where(table["boundary_participant"].astype(bool), np.inf, table["n_participants"]),
        np.where(table["boundary_image"].astype(bool), np.inf, table["n_images"]),
    )
    out["Wald t, G-1 df"] = np.where(
        np.isfinite(g), 2 * stats.t.sf(z, np.where(np.isfinite(g), g - 1, 1)), out["Wald z"]
    )
    floored = np.where(np.isnan(df), g - 1, np.maximum(df, g - 1))
    out["Wald t, Satterthwaite df >= G-1"] = _t_or_z(z, floored)
    if "est_reml" in table:
        zr = (table["est_reml"] / table["se_reml"]).abs().to_numpy()
        dfr = table["df_reml"].to_numpy(dtype=float)
        out["REML Wald z"] = 2 * stats.norm.sf(zr)
        out["REML Wald t, Satterthwaite df"] = _t_or_z(zr, dfr)
        gr = np.minimum(
            np.where(table["sd_participant_reml"] == 0, np.inf, table["n_participants"]),
            np.where(table["sd_image_reml"] == 0, np.inf, table["n_images"]),
        )
        out["REML Wald t, G-1 df"] = _t_or_z(zr, gr - 1)
        floored = np.where(np.isnan(dfr), gr - 1, np.maximum(dfr, gr - 1))
        out["REML Wald t, Satterthwaite df >= G-1 (default)"] = _t_or_z(zr, floored)
        out["REML Wald t, component df"] = _t_or_z(
            zr, table["df_components_reml"].to_numpy(dtype=float)
        )
    if "lrt" in table and table["lrt"].notna().any():
        out["LRT chi2(1)"] = stats.chi2.sf(table["lrt"].to_numpy(dtype=float), 1)
    return out


def _t_or_z(z: np.ndarray, df: np.ndarray) -> np.ndarray:
    """Two-sided p of |z| from Student t with df (the normal where df is inf)."""
    df = np.asarray(df, dtype=float)
    finite = np.isfinite(df)
    return np.where(finite, 2 * stats.t.sf(z, np.where(finite, df, 1)), 2 * stats.norm.sf(z))


def holm_any(p: np.ndarray, alpha: float) -> bool:
    p = np.sort(p[np.isfinite(p)])
    m = len(p)
    return bool(m and p[0] <= alpha / m)


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for scenario, part in table.groupby("scenario", sort=False):
        part = part[part["est"].notna()].reset_index(drop=True)
        null_pairs = part["true_diff"] == 0
        for method, p in p_values(part).items():
            row = {"scenario": scenario, "test": method, "pairs": int(null_pairs.sum())}
            pn = p[null_pairs.to_numpy()]
            pn = pn[np.isfinite(pn)]
            for alpha in (0.05, 0.01):
                rate = float(np.mean(pn <= alpha)) if len(pn) else np.nan
                row[f"reject_{alpha}"] = rate
                row[f"mcse_{alpha}"] = np.sqrt(alpha * (1 - alpha) / max(len(pn), 1))
            if not (~null_pairs).any():
                fwe = [
                    holm_any(p[(part["dataset"] == d).to_numpy()], 0.05)
                    for d in part["dataset"].unique()
                ]
                row["holm_fwe_0.05"] = float(np.mean(fwe))
                row["mcse_fwe"] = np.sqrt(0.05 * 0.95 / len(fwe))
            else:
                alt = p[(~null_pairs).to_numpy()]
                row["power_0.05"] = float(np.mean(alt <= 0.05))
            rows.append(row)
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    """A Markdown table (numbers to 3 decimals, blanks for NaN)."""

    def cell(value) -> str:
        if isinstance(value, float):
            return "" if np.isnan(value) else f"{value:.3f}"
        return str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + " --- |" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.to_numpy()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=int, default=300)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--csv", help="write (or with --summarize read) the per-pair table")
    parser.add_argument("--summarize", action="store_true")
    parser.add_argument("--lrt", action="store_true", help="also fit the null model (slower)")
    parser.add_argument("--reml", action="store_true", help="also fit by REML (slower)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.summarize:
        table = pd.read_csv(args.csv)
    else:
        from tests.glmm_support import simulate_crossed

        records = []
        for s_index, name in enumerate(args.scenarios.split(",")):
            qualities, n_p, n_i, trials, sd_p, sd_i = SCENARIOS[name]
            for d in range(args.datasets):
                seed = args.seed + 100_000 * s_index + d
                votes = simulate_crossed(
                    qualities, n_p, n_i, trials, participant_sd=sd_p, image_sd=sd_i, seed=seed
                )
                for record in fit_pairs(votes, args.lrt, args.reml):
                    record.update(scenario=name, dataset=d)
                    record["true_diff"] = (
                        qualities[record["condition_a"]] - qualities[record["condition_b"]]
                    )
                    records.append(record)
            print(f"{name}: {args.datasets} datasets done", file=sys.stderr, flush=True)
            table = pd.DataFrame(records)
            if args.csv:
                table.to_csv(args.csv, index=False)
        table = pd.DataFrame(records)
    summary = summarize(table)
    print(markdown(summary))
    fitted = table[table["est"].notna()]
    print(
        f"\nCPU per pair fit: median {1000 * fitted['cpu_s'].median():.0f} ms, "
        f"95th percentile {1000 * fitted['cpu_s'].quantile(0.95):.0f} ms "
        f"({len(fitted)} fits, ~{fitted['n_votes'].median():.0f} votes per pair); "
        f"not converged {int((~fitted['converged'].astype(bool)).sum())}, "
        f"participant SD at 0 in {fitted['boundary_participant'].astype(bool).mean():.0%}, "
        f"image SD at 0 in {fitted['boundary_image'].astype(bool).mean():.0%}"
    )


if __name__ == "__main__":
    main()
