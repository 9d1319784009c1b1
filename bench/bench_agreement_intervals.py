"""Alternative intervals for the 2AFC score of a metric, side by side on the harness's
studies: can any principled rule bring every cell of ``metric_agreement`` and
``holdout_score`` into 0.93-0.97?

    python bench/bench_agreement_intervals.py [--studies 200] [--seed 0] [--boot 399]

Same studies and simulated metrics as ``bench_inference.py --outputs metric_agreement
holdout_score`` (its ``make_study``, ``simulated_metrics`` and ``held_out_groups`` split;
same seeds). Per study and metric the per-vote agreements are summed per (participant,
image) cell, and every rule works from those cell sums S and counts N:

- ``report``: ``clustered.two_way_rate`` (V = V_p + V_i - V_c floored at V_c; Student t,
  Satterthwaite df; the floor's cells - 1 df where it binds);
- ``same V, normal``: the report's V with a normal quantile;
- ``continuous df``: V = V_c + max(E_p + E_i, 0) (E_k = V_k - V_c, the factor's excess),
  Satterthwaite on V_c (cells - 1 df) and the positive excesses (G_k - 1 df each), so the
  df grow continuously to the floor's as the excess goes to 0;
- ``floored-estimator df``: the report's V and a Student t whose df are Satterthwaite's for
  the floored estimator max(V_p + V_i - V_c, V_c) itself, 2 E[M]^2 / Var[M], when V_p and
  V_i are scaled chi-squares as below (one df for every study, continuous across the floor);
- ``chi-square mixture``: the report's V, with the quantile q that solves
  E[2 Phi(q sqrt(max(W, V_c / V))) - 1] = 0.95 when V_p and V_i are scaled chi-squares
  (G - 1 df, means max(V_p, V_c), max(V_i, V_c)) and W = (V_p + V_i - V_c) / V (the
  floored estimator's own distribution, by Gauss-Laguerre quadrature);
- ``debiased floor``: V = V_c + E*, E* the excess whose expected floored estimate under
  that model equals the observed max(V_p + V_i - V_c, V_c) (0 where even E* = 0 expects
  more; E* split over the factors as their observed positive excesses), Student t with
  Satterthwaite's df of that debiased estimator under the model at E*;
- ``moments, floored``: method-of-moments variance components of the crossed model
  y = mu + a_participant + b_image + c_cell + e (``crossed_moments``: the three cluster
  sums of squares and the within-cell one set equal to their exact expectations);
  Var(mean) = C + max(P + I, 0) with P = s_a^2 sum n_p^2 / N^2, I = s_b^2 sum n_i^2 / N^2,
  C = s_c^2 sum n_c^2 / N^2 + s_e^2 / N; Satterthwaite df of that linear combination of the
  sums of squares, cells - 1 where P + I <= 0;
- ``moments, truncated``: the same with every component truncated at 0 (the usual
  REML-like convention), Satterthwaite df;
- ``pigeonhole bootstrap-t``: participants and images resampled independently (Owen
  2007), ``--boot`` replicates, the report's V in each; the symmetric interval
  r +- q* sqrt(V), q* the 95 % quantile of |r* - r| / sqrt(V*).

Prints coverage (MC error: SD of the per-study coverage over sqrt(studies)) per output,
truth, scenario and rule, and per rule the number of cells inside 0.93-0.97.
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

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import optimize, special, stats  # noqa: E402

LEVEL = 0.95
BAND = (0.93, 0.97)
RULES = (
    "report",
    "same V, normal",
    "continuous df",
    "floored-estimator df",
    "chi-square mixture",
    "debiased floor",
    "moments, floored",
    "moments, truncated",
    "pigeonhole bootstrap-t",
)


def one_way_parts(S: np.ndarray, N: np.ndarray) -> dict:
    """The rate and the one-way cluster-robust variances of ``clustered._rate_components``
    from cell sums ``S`` and counts ``N`` (participants x images; empty cells N = 0)."""
    n = N.sum()
    rate = S.sum() / n
    R = S - rate * N
    occupied = N > 0
    by_p, by_i = R.sum(1)[N.sum(1) > 0], R.sum(0)[N.sum(0) > 0]
    g = {"p": len(by_p), "i": len(by_i), "c": int(occupied.sum())}
    v = {
        "p": np.sum(by_p**2) / n**2 * g["p"] / (g["p"] - 1),
        "i": np.sum(by_i**2) / n**2 * g["i"] / (g["i"] - 1),
        "c": np.sum(R[occupied] ** 2) / n**2 * g["c"] / (g["c"] - 1),
    }
    return {"rate": rate, "v": v, "g": g}


def report_rule(v: dict, g: dict) -> tuple[float, float]:
    """(V, df) of ``two_way_rate`` (``ScaleVariance.contrast``, two-way)."""
    var = v["p"] + v["i"] - v["c"]
    if var <= v["c"]:
        return v["c"], g["c"] - 1.0
    spread = sum(v[k] ** 2 / (g[k] - 1) for k in "pic")
    return var, min(var**2 / spread, sum(g[k] - 1.0 for k in "pic"))


def continuous_df_rule(v: dict, g: dict) -> tuple[float, float]:
    """(V, df): V_c + the positive excess, each part with its own df (module docstring)."""
    excess = {k: v[k] - v["c"] for k in "pi"}
    total = max(excess["p"] + excess["i"], 0.0)
    positive = sum(max(e, 0.0) for e in excess.values())
    shares = {k: total * max(e, 0.0) / positive if positive > 0 else 0.0 for k, e in excess.items()}
    var = v["c"] + total
    spread = v["c"] ** 2 / (g["c"] - 1) + sum(shares[k] ** 2 / (g[k] - 1) for k in "pi")
    return var, min(var**2 / spread, sum(g[k] - 1.0 for k in "pic"))


def _chi2_nodes(df: int, m: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Laguerre nodes and weights for chi^2_df / df."""
    x, w = special.roots_genlaguerre(m, df / 2 - 1)
    return 2 * x / df, w / special.gamma(df / 2)


def _floored_model(v: dict, g: dict) -> tuple[np.ndarray, np.ndarray, float]:
    """The floored estimator M = max(vp A + vi B - V_c, V_c) / V on a Gauss-Laguerre grid
    (A, B ~ chi^2 / df with G_p - 1, G_i - 1 df; vp = max(V_p, V_c), vi = max(V_i, V_c);
    V = vp + vi - V_c): (M / V, the grid's weights, V)."""
    vp, vi = max(v["p"], v["c"]), max(v["i"], v["c"])
    truth = vp + vi - v["c"]
    a, wa = _chi2_nodes(g["p"] - 1)
    b, wb = _chi2_nodes(g["i"] - 1)
    ratio = np.maximum((vp * a[:, None] + vi * b[None, :] - v["c"]) / truth, v["c"] / truth)
    return ratio, wa[:, None] * wb[None, :], truth


def floored_estimator_df(v: dict, g: dict) -> float:
    """Satterthwaite df 2 E[M]^2 / Var[M] of the floored estimator (``_floored_model``),
    V_c's own variance 2 V_c^2 / (cells - 1) added."""
    ratio, weight, truth = _floored_model(v, g)
    mean = np.sum(weight * ratio)
    var = np.sum(weight * ratio**2) - mean**2 + 2 * (v["c"] / truth) ** 2 / (g["c"] - 1)
    return float(2 * mean**2 / var)


def mixture_quantile(v: dict, g: dict, level: float = LEVEL) -> float:
    """The quantile q of the floored estimator under the scaled chi-square model (module
    docstring)."""
    ratio, weight, _ = _floored_model(v, g)

    def excess(q):
        return np.sum(weight * (2 * special.ndtr(q * np.sqrt(ratio)) - 1)) - level

    return optimize.brentq(excess, 0.5, 50.0)


def debiased_floor(v: dict, g: dict) -> tuple[float, float]:
    """(V, df) of the debiased floor (module docstring): E[M | E] tabulated on a grid of
    excesses E (0 to 50 times the observed estimate) and inverted by interpolation."""
    a, wa = _chi2_nodes(g["p"] - 1)
    b, wb = _chi2_nodes(g["i"] - 1)
    weight = wa[:, None] * wb[None, :]
    cell = v["c"]
    excess = {k: max(v[k] - cell, 0.0) for k in "pi"}
    total = excess["p"] + excess["i"]
    share = {k: excess[k] / total if total > 0 else 0.5 for k in "pi"}

    def floored(e):
        return np.maximum(
            (cell + e * share["p"]) * a[:, None] + (cell + e * share["i"]) * b[None, :] - cell,
            cell,
        )

    observed = max(v["p"] + v["i"] - cell, cell)
    grid = np.concatenate([[0.0], np.geomspace(1e-3 * cell, 50.0 * observed, 160)])
    expected = np.array([np.sum(weight * floored(e)) for e in grid])

    def invert(m):
        return np.interp(m, expected, grid, left=0.0)

    e_star = float(invert(observed))
    debiased = cell + invert(floored(e_star))
    mean = np.sum(weight * debiased)
    var = np.sum(weight * debiased**2) - mean**2 + 2 * cell**2 / (g["c"] - 1)
    return cell + e_star, float(2 * mean**2 / var)


def crossed_moments(S: np.ndarray, N: np.ndarray, within: float | None = None) -> dict:
    """Method-of-moments variance components of y = mu + a_p + b_i + c_pi + e from cell
    sums ``S`` and counts ``N`` (participants x images): the centred cluster sums of
    squares sum_g (T_g - n_g ybar)^2 (g = participant, image, cell) and the within-cell
    sum of squares ``within`` (default: that of 0/1 votes, sum of S - S^2 / N), set equal
    to their exact expectations sum_k s_k^2 sum_g sum_h (n_gh - n_g n_h / N)^2. In a
    balanced design these are the ANOVA equations, so the estimates equal REML's when all
    are positive. Returns sigma2 (participant, image, cell, residual), w (Var(mean) =
    w @ sigma2), lam (Var(mean) = lam @ ss), ss and clusters (G of each sum of squares;
    N - cells + 1 for the within one)."""
    occupied = N > 0
    p_idx, i_idx = np.nonzero(occupied)
    counts, sums = N[occupied], S[occupied]
    n = counts.sum()
    rate = sums.sum() / n
    cells = len(counts)
    member = {
        "p": np.eye(N.shape[0])[p_idx],
        "i": np.eye(N.shape[1])[i_idx],
        "c": np.eye(cells),
    }
    size = {k: z.T @ counts for k, z in member.items()}
    expect = np.zeros((4, 4))
    for row, level in enumerate("pic"):
        for col, other in enumerate("pic"):
            cross = member[level].T @ (counts[:, None] * member[other])
            expect[row, col] = np.sum((cross - np.outer(size[level], size[other]) / n) ** 2)
        expect[row, 3] = n - np.sum(size[level] ** 2) / n
    expect[3, 3] = n - cells
    residual = sums - rate * counts
    ss = np.array(
        [np.sum((member[k].T @ residual) ** 2) for k in "pic"]
        + [np.sum(sums - sums**2 / counts) if within is None else within]
    )
    weights = np.array([np.sum(size[k] ** 2) for k in "pic"] + [n]) / n**2
    clusters = np.array([N.shape[0], N.shape[1], cells, n - cells + 1], dtype=float)
    return {
        "sigma2": np.linalg.solve(expect, ss),
        "w": weights,
        "lam": np.linalg.solve(expect.T, weights),
        "ss": ss,
        "clusters": clusters,
    }


def moment_rules(S: np.ndarray, N: np.ndarray) -> dict[str, tuple[float, float]]:
    """(V, df) of the two moment rules (module docstring)."""
    m = crossed_moments(S, N)
    parts = m["sigma2"] * m["w"]
    spread = np.sum((m["lam"] * m["ss"]) ** 2 / (m["clusters"] - 1))
    cells = m["clusters"][2]
    factors, cell = parts[0] + parts[1], parts[2] + parts[3]
    floored = cell + max(factors, 0.0)
    df = cells - 1 if factors <= 0 else min(floored**2 / spread, m["clusters"][:3].sum() - 3)
    truncated = float(np.maximum(m["sigma2"], 0.0) @ m["w"])
    return {
        "moments, floored": (floored, df),
        "moments, truncated": (truncated, truncated**2 / spread),
    }


def pigeonhole_quantile(S: np.ndarray, N: np.ndarray, boot: int, rng) -> float:
    """95 % quantile of |r* - r| / sqrt(V*) over ``boot`` pigeonhole resamples (participants
    and images drawn independently with replacement; V* the report's V of the resample)."""
    rows = rng.integers(0, S.shape[0], (boot, S.shape[0]))[:, :, None]
    cols = rng.integers(0, S.shape[1], (boot, S.shape[1]))[:, None, :]
    Sb, Nb = S[rows, cols], N[rows, cols]
    n = Nb.sum((1, 2))
    rate = Sb.sum((1, 2)) / n
    R = Sb - rate[:, None, None] * Nb
    gp, gi = S.shape
    gc = (Nb > 0).sum((1, 2))
    vp = (R.sum(2) ** 2).sum(1) / n**2 * gp / (gp - 1)
    vi = (R.sum(1) ** 2).sum(1) / n**2 * gi / (gi - 1)
    vc = (R**2).sum((1, 2)) / n**2 * gc / (gc - 1)
    t = np.abs(rate - S.sum() / N.sum()) / np.sqrt(np.maximum(vp + vi - vc, vc))
    return float(np.quantile(t, LEVEL))


def covered(S: np.ndarray, N: np.ndarray, truth: float, boot: int, rng) -> dict[str, bool]:
    """Per rule: does its 95 % interval of the agreement (cell sums ``S``, counts ``N``)
    cover ``truth``?"""
    S, N = S[:, N.sum(0) > 0], N[:, N.sum(0) > 0]
    S, N = S[N.sum(1) > 0], N[N.sum(1) > 0]
    one_way = one_way_parts(S, N)
    v, g = one_way["v"], one_way["g"]
    miss = abs(one_way["rate"] - truth)
    var, df = report_rule(v, g)
    half = {
        "report": stats.t.isf((1 - LEVEL) / 2, df) * np.sqrt(var),
        "same V, normal": stats.norm.isf((1 - LEVEL) / 2) * np.sqrt(var),
        "floored-estimator df": stats.t.isf((1 - LEVEL) / 2, floored_estimator_df(v, g))
        * np.sqrt(var),
        "chi-square mixture": mixture_quantile(v, g) * np.sqrt(var),
        "pigeonhole bootstrap-t": pigeonhole_quantile(S, N, boot, rng) * np.sqrt(var),
    }
    others = {
        "continuous df": continuous_df_rule(v, g),
        "debiased floor": debiased_floor(v, g),
        **moment_rules(S, N),
    }
    for name, (var_k, df_k) in others.items():
        half[name] = stats.t.isf((1 - LEVEL) / 2, df_k) * np.sqrt(var_k)
    return {name: bool(miss <= half[name]) for name in RULES}


def study_cells(study, harness) -> list[dict]:
    """Per simulated metric and output (metric_agreement: all images; holdout_score: the
    held-out half): the agreement's cell sums S and counts N and the truth."""
    from bench_agreement_null import metric_agreements

    from analysis.metrics import HOLDOUT_SHARE, held_out_groups

    main = study.main
    participant = pd.factorize(main["participant"].astype(str), sort=True)[0]
    images = main["image_id"].astype(str).to_numpy()
    levels = np.unique(images)
    image = np.searchsorted(levels, images)
    held = np.isin(levels, held_out_groups(images, HOLDOUT_SHARE, study.seed))
    out = []
    for _, agree, truth in metric_agreements(study, harness):
        if np.any(agree == 0.5):
            raise ValueError("a tie between two simulated distances: the cell sums need 0/1")
        S = np.zeros((participant.max() + 1, len(levels)))
        N = np.zeros_like(S)
        np.add.at(S, (participant, image), agree)
        np.add.at(N, (participant, image), 1.0)
        for output, columns in (("metric_agreement", slice(None)), ("holdout_score", held)):
            out.append({"output": output, "S": S[:, columns], "N": N[:, columns], "truth": truth})
    return out


def run(studies: int, seed: int, boot: int) -> pd.DataFrame:
    """Coverage per (output, truth, scenario, rule) with its MC error."""
    import bench_agreement_null

    harness = bench_agreement_null._harness()
    rows = []
    for scenario in harness.SCENARIOS:
        for truth in harness.TRUTHS:
            for index in range(studies):
                study_seed = harness.study_seed(seed, scenario, truth, index)
                task = harness.Task(
                    scenario, truth, index, study_seed, "thurstone", 10, (), ("two-way",), False
                )
                rng = np.random.default_rng([study_seed, 29])
                for cell in study_cells(harness.make_study(task), harness):
                    hits = covered(cell["S"], cell["N"], cell["truth"], boot, rng)
                    rows.extend(
                        {
                            "output": cell["output"],
                            "truth": truth,
                            "scenario": scenario,
                            "study": index,
                            "rule": rule,
                            "covered": hit,
                        }
                        for rule, hit in hits.items()
                    )
    per_study = (
        pd.DataFrame(rows)
        .groupby(["output", "truth", "scenario", "rule", "study"], sort=False)["covered"]
        .mean()
    )
    grouped = per_study.groupby(level=[0, 1, 2, 3], sort=False)
    return pd.DataFrame(
        {"coverage": grouped.mean(), "mc": grouped.std() / np.sqrt(studies)}
    ).reset_index()


def markdown(table: pd.DataFrame) -> str:
    """One row per output x truth x rule, scenarios as columns; then cells in band per rule."""
    lines = []
    scenarios = list(dict.fromkeys(table["scenario"]))
    lines.append("| output | truth | rule | " + " | ".join(scenarios) + " |")
    lines.append("| --- | --- | --- | " + " | ".join("---" for _ in scenarios) + " |")
    for (output, truth, rule), g in table.groupby(["output", "truth", "rule"], sort=False):
        values = g.set_index("scenario")
        cells = [
            f"{values.at[s, 'coverage']:.3f} ± {values.at[s, 'mc']:.3f}"
            + ("" if BAND[0] <= values.at[s, "coverage"] <= BAND[1] else " out")
            for s in scenarios
        ]
        lines.append(f"| {output} | {truth} | {rule} | " + " | ".join(cells) + " |")
    inside = table.assign(ok=table["coverage"].between(*BAND)).groupby("rule", sort=False)["ok"]
    lines.append("")
    lines.append("| rule | cells in 0.93-0.97 (of 16) |")
    lines.append("| --- | --- |")
    lines.extend(f"| {rule} | {int(ok.sum())} |" for rule, ok in inside)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=200, help="per scenario and truth")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--boot", type=int, default=399, help="pigeonhole replicates")
    args = parser.parse_args(argv)
    if args.studies < 2:
        parser.error("--studies must be >= 2 (the MC error needs two studies)")
    if args.boot < 20:
        parser.error("--boot must be >= 20 (a 95 % quantile needs replicates beyond it)")
    import bench_agreement_null

    start = time.perf_counter()
    table = run(args.studies, args.seed, args.boot)
    print(
        f"# 2AFC-score intervals side by side: {args.studies} studies per scenario x truth, "
        f"seed {args.seed}, {args.boot} pigeonhole replicates; machine: "
        f"{bench_agreement_null._harness().machine()}"
    )
    print(markdown(table))
    print(f"\n{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
