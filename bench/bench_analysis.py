"""Benchmark: the full analysis of 1,000,000 simulated votes, and Bradley–Terry vs choix.

    python bench/bench_analysis.py [--votes 1000000] [--n-boot 500]

Study: 7 conditions, 500 images, 2,000 participants (500 votes each), observer and image
random effects, left bias. Times (wall clock) and peak memory (max RSS of a child
process that does only that step) are printed side by side with ratios. The analysis is
the report's default (``pstudy analyze``: the per-pair GLMM included; at this size each
pair has more than ``analysis.glmm.MAX_LEVELS`` participants + images and gets the
two-way cluster-robust GLM instead, named in its method column); ``--no-mixed`` times it
without the GLMM.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONDITIONS = {
    "l1": 0.0,
    "l2": -0.2,
    "ssim": 0.3,
    "msssim": 0.6,
    "watson-dft": 0.5,
    "deep": 0.8,
    "lpips-vgg": 0.7,
}


def child_full(path: str, out: str, n_boot: int, mixed: bool) -> None:
    """Load + validate + every analysis layer + write all outputs."""
    from analysis.io import load_responses
    from analysis.report import AnalysisOptions, run_analysis, write_outputs

    times = {}
    start = time.perf_counter()
    loaded = load_responses(path)
    times["load_validate_s"] = time.perf_counter() - start
    t = time.perf_counter()
    result = run_analysis(loaded, AnalysisOptions(n_boot=n_boot, mixed=mixed))
    times["analysis_s"] = time.perf_counter() - t
    t = time.perf_counter()
    write_outputs(result, out)
    times["write_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - start
    times["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(times))


def run_child(args: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bt_vs_choix(frame) -> dict:
    import choix
    import numpy as np

    from analysis.scaling import condition_names, fit_scale, win_matrix

    names = condition_names(frame)
    t = time.perf_counter()
    wins = win_matrix(frame, names)
    count_s = time.perf_counter() - t
    t = time.perf_counter()
    ours = fit_scale(wins, "bt", 0.0)
    ours_s = time.perf_counter() - t
    t = time.perf_counter()
    ilsr = choix.ilsr_pairwise_dense(wins, alpha=0.0)
    ilsr_s = time.perf_counter() - t
    sample = frame.sample(20_000, random_state=0)
    index = {n: i for i, n in enumerate(names)}
    winner = sample["chosen_condition"].map(index).to_numpy()
    loser = np.where(
        sample["chosen_condition"] == sample["condition_left"],
        sample["condition_right"],
        sample["condition_left"],
    )
    loser = np.array([index[x] for x in loser])
    data = list(zip(winner.tolist(), loser.tolist(), strict=True))
    t = time.perf_counter()
    opt = choix.opt_pairwise(len(names), data, alpha=1e-9, method="BFGS", tol=1e-10)
    opt_s = time.perf_counter() - t
    t = time.perf_counter()
    ours_sample = fit_scale(win_matrix(sample, names), "bt", 0.0)
    ours_sample_s = time.perf_counter() - t
    return {
        "count_s": count_s,
        "ours_1M_s": ours_s,
        "choix_ilsr_dense_1M_s": ilsr_s,
        "max_abs_diff_vs_ilsr": float(np.max(np.abs(ours - (ilsr - ilsr.mean())))),
        "ours_20k_s": ours_sample_s,
        "choix_opt_pairwise_20k_s": opt_s,
        "max_abs_diff_vs_opt": float(np.max(np.abs(ours_sample - (opt - opt.mean())))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--votes", type=int, default=1_000_000)
    parser.add_argument("--n-boot", type=int, default=500)
    parser.add_argument("--no-mixed", action="store_true", help="without the per-pair GLMM")
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _, path, out, n_boot, mixed = args.child
        child_full(path, out, int(n_boot), mixed == "mixed")
        return
    from analysis.simulation import simulate_responses

    participants = 2000
    per = args.votes // participants
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        frame = simulate_responses(
            CONDITIONS, participants, 500, per, observer_sd=0.4, image_sd=0.3, left_bias=0.1, seed=0
        )
        path = Path(tmp) / "votes.parquet"
        frame.to_parquet(path)
        data_mib = frame.memory_usage(deep=True).sum() / 2**20
        print(
            f"simulated {len(frame):,} votes ({data_mib:.0f} MiB in pandas, "
            f"{path.stat().st_size / 2**20:.0f} MiB parquet) in {time.perf_counter() - t:.1f} s"
        )
        mixed = "no-mixed" if args.no_mixed else "mixed"
        full = run_child(
            ["--child", "full", str(path), str(Path(tmp) / "out"), str(args.n_boot), mixed]
        )
        print(f"full analysis (pstudy analyze), n_boot={args.n_boot}, {mixed}:")
        for key, value in full.items():
            print(f"  {key:>16}: {value:8.1f}")
        print(f"  peak memory / data in pandas: {full['peak_rss_mib'] / data_mib:.1f}x")
        bt = bt_vs_choix(frame)
        print("Bradley–Terry fit (7 conditions):")
        print(
            f"  all {len(frame):,} votes: counting {1000 * bt['count_s']:.0f} ms, then on the "
            f"counts ours {1000 * bt['ours_1M_s']:.2f} ms vs choix "
            f"ilsr_pairwise_dense {1000 * bt['choix_ilsr_dense_1M_s']:.2f} ms; "
            f"(choix/ours {bt['choix_ilsr_dense_1M_s'] / bt['ours_1M_s']:.2f}); max |diff| "
            f"{bt['max_abs_diff_vs_ilsr']:.1e}"
        )
        print(
            f"  20k votes: ours {1000 * bt['ours_20k_s']:.1f} ms vs choix opt_pairwise "
            f"{1000 * bt['choix_opt_pairwise_20k_s']:.0f} ms (choix/ours "
            f"{bt['choix_opt_pairwise_20k_s'] / bt['ours_20k_s']:.0f}x); max |diff| "
            f"{bt['max_abs_diff_vs_opt']:.1e}"
        )


if __name__ == "__main__":
    main()
