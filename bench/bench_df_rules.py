"""Degrees-of-freedom rules for the report's per-pair intervals and tests, side by side.

    python bench/bench_df_rules.py glmm [--studies 200] [--jobs 2] [--scenarios ...]
    python bench/bench_df_rules.py pairs [--studies 200] [--jobs 2] [--scenarios ...]

Simulates the null studies of ``bench/bench_inference.py`` (same design, same seeds:
study i of a scenario here is study i there), fits each pair once and records what a
df rule needs, then scores every rule on the same fits: coverage of the 95 % interval
(truth: log-odds 0 for the GLMM, the population rate for ``pairs``), single-test
rejection at .05 and the Holm family-wise error over the 10 pairs (FWE).

glmm (``analysis.glmm``): the report's rule (``glmm_pair_tests``: SDs pooled over the
study's pairs, component df, a pair beyond them keeps its own fit) and, per pair's own
REML fit (``test="reml"``, the previous report rule), the Wald t's
variance V = se^2, the Hessian Satterthwaite df, each free factor's share of V
(c_k = theta_k dV/dtheta_k / 2, as ``_satterthwaite`` computes it), its SD and the SD's
Hessian variance, and the restricted-deviance rise when its SD is set to 0 (the others
held: a likelihood-ratio statistic for "SD = 0"). Rules: the previous report's (Hessian
df, floored at G - 1 of the factors whose SD is not 0), components (c_k with G_k - 1 df),
per-factor min (each c_k with min(G_k - 1, theta_k^2 / (2 var theta_k)) df), and the
floor or the components over only the factors whose SD's LR statistic exceeds a
threshold (an SD far from significant treated as 0; z when none is left), each factor's
share relative to the binomial part averaged over the study's pairs (borrowing across
pairs; alone, or as a floor under the pair's own share), and blends
of the report's and the component df: 1/df = w/df_report + (1 - w)/df_components (2/df
is the relative variance of V's estimate, so this averages the two rules' estimates of
it).

pairs (``clustered.two_way_rate``): V_participants, V_images, V_cells and their
cluster counts. Rules: the report's (the factors' shares pooled over the study's pairs,
``clustered.two_way_rate_tests``), each pair's own (V = V_p + V_i - V_c, floored at V_c; Satterthwaite
df, cells - 1 where floored), components over the excess (V = V_c + (V_p - V_c)+ +
(V_i - V_c)+, each excess with G - 1 df), and the report's V with the Satterthwaite
spread of the difference (var V_p + var V_i - var V_c: the three share the vote-level
noise).

The recording wraps two private functions of ``analysis.glmm`` (this is a measurement
script, not a code path of the package). Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import bench_inference as harness  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

ALPHA = 0.05
LRT_THRESHOLDS = (0.5, 1.0, 2.0)
HARMONIC_WEIGHTS = (0.2, 0.25, 0.5)

# ----------------------------------------------------------------------------- recording


def _install_glmm_recorder():
    """Wrap ``glmm._satterthwaite`` to keep, per fit, the quantities the rules need."""
    import analysis.glmm as glmm

    if getattr(glmm, "_df_rules_recorder", False):
        return glmm
    original = glmm._satterthwaite
    record = {}

    def satterthwaite(model, theta, beta, b, free, theta_cov, variance):
        out = original(model, theta, beta, b, free, theta_cov, variance)
        idx = np.flatnonzero(free)
        share, lrt = np.zeros(len(theta)), np.full(len(theta), np.nan)
        if idx.size:
            grad = glmm._variance_gradient(model, theta, beta, b, idx)
            share[idx] = theta[idx] * grad[:, 0] / 2
            at = model.pirls(theta, beta, b, joint=True, reml=True)[2]
            for k in idx:
                zero = glmm._with(theta, k, 0.0)
                lrt[k] = model.pirls(zero, beta, b, joint=True, reml=True)[2] - at
        record.update(
            share=share,
            lrt=lrt,
            theta=theta.copy(),
            theta_var=np.diag(theta_cov).copy(),
            levels=model.d.n_levels.astype(float),
            free=free.copy(),
            hessian_df=float(out[0][0]),
        )
        return out

    glmm._satterthwaite = satterthwaite
    glmm._df_rules_record = record
    glmm._df_rules_recorder = True
    return glmm


SEED = {"value": 0}  # --seed: bench_inference's seed (0 = its default studies)


def _study(scenario: str, truth: str, index: int):
    seed = harness.study_seed(SEED["value"], scenario, truth, index)
    task = harness.Task(scenario, truth, index, seed, "thurstone", 10, (), ("two-way",), False)
    return harness.make_study(task)


def _glmm_study(args) -> list[dict]:
    """One null study: each pair fitted as ``glmm_pair_tests`` fits it (REML test fit)."""
    from analysis.clustered import _pair_frame

    scenario, truth, index = args
    glmm = _install_glmm_recorder()
    study = _study(scenario, truth, index)
    rows = []
    frame = _pair_frame(study.main, True)
    report = glmm.glmm_pair_tests(study.main, ALPHA, True, with_ml=False)  # the pooled rule
    for (_, group), pooled in zip(
        frame.groupby(["condition_a", "condition_b"], sort=True),
        report.itertuples(index=False),
        strict=True,
    ):
        glmm._df_rules_record.clear()
        row = {
            "n_participants": group["participant"].nunique(),
            "n_images": group["image_id"].nunique(),
        }
        result = glmm._pair_row(group, ALPHA, True, "reml", glmm.MAX_LEVELS, False, row)
        rows.append(
            {
                "scenario": scenario,
                "truth": truth,
                "study": index,
                "estimate": result.get("log_odds", np.nan),
                "target": 0.0,
                "null_value": 0.0,
                "null": True,
                "var": result.get("se", np.nan) ** 2,
                "df_report": result.get("df", np.nan),
                "pooled_estimate": pooled.log_odds,
                "pooled_var": pooled.se**2,
                "pooled_df": pooled.df,
                **dict(glmm._df_rules_record),
            }
        )
    return rows


def _pairs_study(args) -> list[dict]:
    """One study: each pair's two-way rate parts (``clustered.two_way_rate``)."""
    from analysis.clustered import _pair_frame
    from analysis.scaling import ScaleVariance

    scenario, truth, index = args
    study = _study(scenario, truth, index)
    rows = []
    frame = _pair_frame(study.main, False)
    pairs = []
    for (a, b), group in frame.groupby(["condition_a", "condition_b"], sort=True):
        y = group["win_a"].to_numpy(dtype=float)
        codes = {
            "participant": pd.factorize(group["participant"])[0],
            "image": pd.factorize(group["image_id"])[0],
        }
        codes["cell"] = pd.factorize(
            group["participant"].astype(str) + "|" + group["image_id"].astype(str)
        )[0]
        parts, clusters = {}, {}
        for name, c in codes.items():
            sums = np.bincount(c, y - y.mean())
            g = len(sums)
            parts[name], clusters[name] = np.sum(sums**2) / len(y) ** 2 * g / (g - 1), g
        report = ScaleVariance(
            "two-way rate",
            "two-way",
            {k: np.array([[v]]) for k, v in parts.items()},
            clusters,
        ).contrast(np.ones((1, 1)))
        pairs.append((a, b))
        rows.append(
            {
                "scenario": scenario,
                "truth": truth,
                "study": index,
                "estimate": y.mean(),
                "n": len(y),
                "null_value": 0.5,
                "var_report": float(report[0][0]),
                "df_report": float(report[1][0]),
                **{f"v_{k}": v for k, v in parts.items()},
                **{f"g_{k}": float(v) for k, v in clusters.items()},
            }
        )
    targets = study.rate_truth(pairs)
    for row, target, null in zip(rows, targets, study.true_null(pairs), strict=True):
        row.update(target=float(target), null=bool(null))
    return rows


# ----------------------------------------------------------------------------- the rules


def _stack(frame: pd.DataFrame, column: str) -> np.ndarray:
    return np.array(
        [v if isinstance(v, np.ndarray) else np.full(2, np.nan) for v in frame[column]],
        dtype=float,
    )


def glmm_rules(frame: pd.DataFrame) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Rule name -> (variance, df) per pair."""
    var = frame["var"].to_numpy(dtype=float)
    share, lrt = _stack(frame, "share"), _stack(frame, "lrt")
    theta, theta_var = _stack(frame, "theta"), _stack(frame, "theta_var")
    levels, free = _stack(frame, "levels"), _stack(frame, "free") > 0

    def component_df(active, factor_df):
        with np.errstate(divide="ignore", invalid="ignore"):
            spread = np.sum(np.where(active, share**2 / factor_df, 0.0), axis=1)
            return np.where(spread > 0, var**2 / spread, np.inf)

    with np.errstate(divide="ignore", invalid="ignore"):
        hessian_factor = theta**2 / (2 * theta_var)
    hessian_factor = np.where(np.isfinite(hessian_factor), hessian_factor, levels - 1)
    rules = {
        "report: SDs pooled over the study's pairs, component df, own if beyond": (
            frame["pooled_var"].to_numpy(dtype=float),
            frame["pooled_df"].to_numpy(dtype=float),
            frame["pooled_estimate"].to_numpy(dtype=float),
        ),
        "own SDs (previous report): Hessian df, floor G - 1": (
            var,
            frame["df_report"].to_numpy(dtype=float),
        ),
        "components (G_k - 1 each)": (var, component_df(free, np.maximum(levels - 1, 1))),
        "components, min(G_k - 1, Hessian) each": (
            var,
            component_df(free, np.maximum(np.minimum(levels - 1, hessian_factor), 1e-9)),
        ),
    }
    # borrowing across pairs: each factor's share relative to the binomial part
    # (V_b = V - sum c_k), averaged over the study's pairs, replaces (or floors) the
    # pair's own share
    known = np.where(np.isfinite(share), share, 0.0)
    binomial = var - known.sum(axis=1)
    relative = known / binomial[:, None]
    study = (frame["scenario"] + "|" + frame["truth"] + "|" + frame["study"].astype(str)).to_numpy()
    pooled = pd.DataFrame(relative).groupby(study).transform("mean").to_numpy()
    for label, shares in (
        ("study-pooled shares", binomial[:, None] * pooled),
        ("max(own, study-pooled) shares", binomial[:, None] * np.maximum(relative, pooled)),
    ):
        spread = np.sum(shares**2 / np.maximum(levels - 1, 1), axis=1)
        total = binomial + shares.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            rules[f"{label}, components df"] = (
                total,
                np.where(spread > 0, total**2 / spread, np.inf),
            )
    report_df = frame["df_report"].to_numpy(dtype=float)
    components = rules["components (G_k - 1 each)"][1]
    for weight in HARMONIC_WEIGHTS:
        with np.errstate(divide="ignore"):
            inverse = weight / report_df + (1 - weight) / components
            blended = np.where(inverse > 0, 1 / np.where(inverse > 0, inverse, 1.0), np.inf)
        rules[f"1/df = {weight:g}/df_report + {1 - weight:g}/df_components"] = (var, blended)
    for threshold in LRT_THRESHOLDS:
        active = free & (lrt > threshold)
        floor = np.where(active, levels, np.inf).min(axis=1) - 1
        rules[f"floor G - 1 over SDs with LR > {threshold:g} (z if none)"] = (var, floor)
        rules[f"components over SDs with LR > {threshold:g}"] = (
            var,
            component_df(active, np.maximum(levels - 1, 1)),
        )
    return rules


def pairs_rules(frame: pd.DataFrame) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    vp, vi, vc = (frame[f"v_{k}"].to_numpy() for k in ("participant", "image", "cell"))
    gp, gi, gc = (frame[f"g_{k}"].to_numpy() for k in ("participant", "image", "cell"))
    raw = vp + vi - vc
    floored = raw <= vc
    var = np.where(floored, vc, raw)
    cap = gp + gi + gc - 3
    excess_p, excess_i = np.maximum(vp - vc, 0), np.maximum(vi - vc, 0)
    excess = vc + excess_p + excess_i
    excess_spread = vc**2 / (gc - 1) + excess_p**2 / (gp - 1) + excess_i**2 / (gi - 1)
    spread = np.maximum(vp**2 / (gp - 1) + vi**2 / (gi - 1) - vc**2 / (gc - 1), 1e-300)
    return {
        "own pair: V_p + V_i - V_c floored at V_c, Satterthwaite (two_way_rate)": (
            frame["var_report"].to_numpy(),
            frame["df_report"].to_numpy(),
        ),
        "report: shares pooled over the study's pairs, G - 1 df, own if beyond": _pooled_rule(
            frame
        ),
        "excess components: V_c + (V_p - V_c)+ + (V_i - V_c)+": (excess, excess**2 / excess_spread),
        "report's V, spread var V_p + var V_i - var V_c": (
            var,
            np.minimum(np.where(floored, gc - 1, var**2 / spread), cap),
        ),
    }


def _pooled_rule(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The report's rule (``clustered.two_way_rate_tests``) from the recorded parts: the
    shares V_k / V_c - 1 averaged over each study's pairs (vote-weighted),
    V = V_c (1 + max(r_p + r_i, 0)), G - 1 df of the fewest-level factor with a positive
    share; a pair whose own V exceeds that by HETEROGENEITY_Z SEs keeps its own."""
    from analysis.clustered import HETEROGENEITY_Z

    vp, vi, vc = (frame[f"v_{k}"].to_numpy() for k in ("participant", "image", "cell"))
    gp, gi, gc = (frame[f"g_{k}"].to_numpy() for k in ("participant", "image", "cell"))
    study = frame[["scenario", "truth", "study"]].astype(str).agg("|".join, axis=1).to_numpy()
    n = frame["n"].to_numpy(dtype=float)
    total = pd.Series(n).groupby(study).transform("sum").to_numpy()
    shares = {
        k: pd.Series(n * (v / vc - 1.0)).groupby(study).transform("sum").to_numpy() / total
        for k, v in (("participant", vp), ("image", vi))
    }
    var = vc * (1.0 + np.maximum(shares["participant"] + shares["image"], 0.0))
    active_p, active_i = shares["participant"] > 0, shares["image"] > 0
    df = np.where(
        active_p & active_i,
        np.minimum(gp, gi) - 1.0,
        np.where(active_i, gi - 1.0, np.where(active_p, gp - 1.0, gc - 1.0)),
    )
    own_var, own_df = frame["var_report"].to_numpy(), frame["df_report"].to_numpy()
    beyond = own_var > var * (1.0 + HETEROGENEITY_Z * np.sqrt(2.0 / (gi - 1.0)))
    return np.where(beyond, own_var, var), np.where(beyond, own_df, df)


def score(frame: pd.DataFrame, rules: dict, pairs_per_study: int = 10) -> pd.DataFrame:
    """Coverage (± MC error), rejection at .05 and Holm FWE (null) per rule and cell."""
    out = []
    target = frame["target"].to_numpy(dtype=float)
    null = frame["null"].to_numpy(dtype=bool)
    for name, (var, df, *own_estimate) in rules.items():
        # a rule may bring its own estimate (the pooled fit's); else the pair's own fit's
        estimate = own_estimate[0] if own_estimate else frame["estimate"].to_numpy(dtype=float)
        se = np.sqrt(np.asarray(var, dtype=float))
        df = np.asarray(df, dtype=float)
        finite = np.isfinite(df)
        safe = np.where(finite, df, 1.0)
        crit = np.where(finite, stats.t.isf(ALPHA / 2, safe), stats.norm.isf(ALPHA / 2))
        covered = np.abs(estimate - target) <= crit * se
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.abs(estimate - frame["null_value"].to_numpy(dtype=float)) / se
            p = np.where(finite, 2 * stats.t.sf(t, safe), 2 * stats.norm.sf(t))
        p = np.where(np.isfinite(p), p, 1.0)
        work = frame[["scenario", "truth", "study"]].assign(covered=covered, p=p, null=null)
        for (scenario, truth), group in work.groupby(["scenario", "truth"], sort=False):
            per_study = group.groupby("study")["covered"].mean()
            row = {
                "rule": name,
                "scenario": scenario,
                "truth": truth,
                "coverage": per_study.mean(),
                "mc": per_study.std(ddof=1) / np.sqrt(len(per_study)),
            }
            if group["null"].all():
                ranked = np.sort(group["p"].to_numpy().reshape(-1, pairs_per_study), axis=1)
                steps = pairs_per_study - np.arange(pairs_per_study)
                holm = np.maximum.accumulate(ranked * steps, axis=1)[:, 0]
                row.update(reject05=float(np.mean(group["p"] < ALPHA)), fwe=np.mean(holm < ALPHA))
            out.append(row)
    return pd.DataFrame(out)


def markdown(table: pd.DataFrame) -> str:
    scenarios = [s for s in harness.SCENARIOS if s in set(table["scenario"])]
    lines = [
        "| rule | truth | " + " | ".join(harness.SCENARIOS[s][0] for s in scenarios) + " |",
        "| --- | --- | " + " | ".join("---" for _ in scenarios) + " |",
    ]
    for (rule, truth), group in table.groupby(["rule", "truth"], sort=False):
        group = group.set_index("scenario")
        cells = []
        for s in scenarios:
            r = group.loc[s]
            text = f"{r['coverage']:.3f} ± {r['mc']:.3f}"
            if "fwe" in r and np.isfinite(r.get("fwe", np.nan)):
                text += f" / {r['reject05']:.3f} / {r['fwe']:.3f}"
            cells.append(text)
        lines.append(f"| {rule} | {truth} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", choices=("glmm", "pairs"))
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--scenarios", default=",".join(harness.SCENARIOS))
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0, help="bench_inference's --seed")
    parser.add_argument("--from-pickle", default=None, help="score saved records instead")
    parser.add_argument("--pickle", default=None, help="also keep the per-pair records here")
    args = parser.parse_args(argv)
    SEED["value"] = args.seed
    scenarios = [s for s in args.scenarios.split(",") if s]
    truths = ("null",) if args.output == "glmm" else harness.TRUTHS
    tasks = [(s, t, i) for s in scenarios for t in truths for i in range(args.studies)]
    work = _glmm_study if args.output == "glmm" else _pairs_study
    start = time.perf_counter()
    if args.from_pickle:
        frame = pd.read_pickle(args.from_pickle)
    elif args.jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(args.jobs) as pool:
            frame = pd.DataFrame([r for rows in pool.map(work, tasks, chunksize=4) for r in rows])
    else:
        frame = pd.DataFrame([r for task in tasks for r in work(task)])
    if args.pickle:
        frame.to_pickle(args.pickle)
    rules = glmm_rules(frame) if args.output == "glmm" else pairs_rules(frame)
    print(
        f"# {args.output}: {args.studies} studies per cell, seed {args.seed}, "
        f"{time.perf_counter() - start:.0f} s; "
        "cells: coverage ± MC error [/ rejection at .05 / Holm FWE under the null]"
    )
    print(markdown(score(frame, rules)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
