"""The benchmark scripts still run and print what docs/benchmarks.md quotes (tiny sizes;
the numbers themselves live in docs/benchmarks.md, not here)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def run_script(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def load_harness():
    """bench/bench_inference.py as a module (through bench_agreement_null's loader)."""
    if str(REPO / "bench") not in sys.path:
        sys.path.insert(0, str(REPO / "bench"))
    import bench_agreement_null

    return bench_agreement_null._harness()


def usage_error(script: str, *args: str) -> str:
    """Run bench/``script`` with bad ``args``: assert a usage error (exit 2, no
    traceback) and return its stderr."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    return done.stderr


def table_rows(output: str) -> dict[str, list[str]]:
    """Markdown table rows keyed by their first cells (all but the numeric ones)."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 3 and re.fullmatch(r"[\d.]+", cells[-1]):
            rows[" | ".join(c for c in cells if not re.fullmatch(r"[\d.]+", c))] = cells
    return rows


def test_bench_losses_prints_ratios_and_the_machine():
    output = run_script(
        "bench/bench_losses.py",
        "--quick",
        "--repeats",
        "1",
        "--threads",
        "1",
        "--losses",
        "l2",
        "watson-dft",
        "msssim",
    )
    assert re.search(r"^machine: .+, \d+ cores, ", output, re.M), output
    rows = table_rows(output)
    assert set(rows) == {
        "64×3×64×64 | l2",
        "64×3×64×64 | msssim",
        "64×3×64×64 | watson-dft",
        "64×3×64×64 | watson-dft (frozen parameters)",
    }, rows
    for cells in rows.values():
        assert float(cells[-2]) > 0 and float(cells[-1]) > 0


def test_bench_training_prints_a_row_per_loss():
    output = run_script(
        "bench/bench_training.py",
        "--losses",
        "l2,watson-dft",
        "--size",
        "32",
        "--batch",
        "4",
        "--steps",
        "1",
        "--rounds",
        "1",
        "--warmup",
        "0",
        "--threads",
        "1",
    )
    header = output.splitlines()[0]
    assert header.startswith("# training throughput") and " cores, " in header, header
    rows = table_rows(output)
    assert set(rows) == {"l2", "watson-dft"}, rows
    assert float(rows["l2"][-1]) == 1.0


def test_bench_training_full_runs_the_real_loop_and_extrapolates():
    output = run_script(
        "bench/bench_training.py",
        "--full",
        "--paper",
        "--steps",
        "4",
        "--size",
        "32",
        "--width",
        "4",
        "--latent",
        "8",
        "--batch",
        "4",
        "--train-patches",
        "64",
        "--conditions",
        "l2,watson-dft",
        "--rounds",
        "1",
        "--threads",
        "1",
    )
    assert output.startswith("# full paper preset: 2 conditions"), output
    rows = {
        line.split("|")[1].strip(): line for line in output.splitlines() if "| 100000 |" in line
    }
    assert set(rows) == {"l2", "watson-dft"}, output
    for line in rows.values():
        loop, pure, ratio, wall, steps, minutes = (float(c) for c in line.split("|")[2:8])
        assert loop > 0 and pure > 0 and ratio == pytest.approx(pure / loop, rel=0.02)
        assert minutes * 60 > wall  # 100,000 steps take longer than the 4 timed
    assert re.search(r"^whole paper preset, extrapolated: [\d.]+ min", output, re.M), output


def test_bench_fit_prints_a_rate_per_loss():
    output = run_script(
        "bench/bench_fit.py", "--triplets", "20", "--size", "32", "--epochs", "1", "--threads", "1"
    )
    assert re.search(r"^machine: .+, \d+ cores, ", output, re.M), output
    rows = {line.split()[0]: line.split() for line in output.splitlines()[3:]}
    assert set(rows) == {"watson-dft", "deep"}, output
    assert rows["watson-dft"][2] == "—" and float(rows["deep"][2]) > 0
    assert all(float(row[3]) > 0 for row in rows.values())


def test_bench_design_prints_votes_needed_per_design(tmp_path):
    out = tmp_path / "design.json"
    output = run_script("bench/bench_design.py", "--reps", "2", "--conditions", "4",
                        "--workers", "1", "--json", str(out))
    for design in ("balanced", "random", "asap", "ours", "ours-eig"):
        assert re.search(rf"^\s+4 {design}\s+\d+", output, re.M), output
    import json

    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 5 and all(r["votes"] > 0 for r in rows)
    bad = subprocess.run([sys.executable, "bench/bench_design.py", "--conditions", "2"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--conditions" in bad.stderr


@pytest.mark.parametrize("database", ["sqlite", pytest.param("postgres",
                                                             marks=pytest.mark.postgres)])
def test_bench_next_latency_prints_both_designs(database):
    output = run_script("bench/bench_next_latency.py", "--conditions", "3", "--images", "2",
                        "--participants", "2", "--rounds", "1", "--database", database)
    assert f"2 participants × 1 fetches, {database}, in-process" in output
    for design in ("balanced", "active"):
        assert re.search(rf"^{design}\s+next: p50\s+[\d.]+ ms", output, re.M), output


def test_bench_next_latency_holds_batches_open_and_refuses_too_many_holders():
    output = run_script("bench/bench_next_latency.py", "--conditions", "3", "--images", "3",
                        "--participants", "3", "--rounds", "2", "--holding", "2")
    assert "3 participants × 2 fetches, sqlite, in-process, 2 holding their batch" in output
    for design in ("balanced", "active"):
        assert re.search(rf"^{design}\s+next: p50\s+[\d.]+ ms", output, re.M), output
    bad = subprocess.run([sys.executable, "bench/bench_next_latency.py", "--participants", "2",
                          "--holding", "2"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "--holding" in bad.stderr and "Traceback" not in bad.stderr


def test_bench_votes_next_latency_prints_both_designs():
    output = run_script("bench/bench_votes.py", "--next-latency", "--databases", "sqlite",
                        "--conditions", "3", "--images", "2", "--participants", "4",
                        "--rounds", "2", "--think-s", "0.05", "--arrival-s", "0.2")
    for design in ("balanced", "active"):
        for run in ("saturated", "paced", "arrivals"):
            assert re.search(rf"^sqlite\s+{design}\s+{run}\s+8\s+[\d.]+\s+[\d.]+\s+0$",
                             output, re.M), output


def test_bench_df_rules_scores_the_reports_own_intervals():
    """bench_df_rules.py records, for its "report" rules, exactly the variance and df of
    the report's tables (two_way_rate_tests; glmm_pair_tests) and of each pair's own
    two_way_rate, and prints a row per
    rule."""
    import importlib.util

    import numpy as np

    from analysis.clustered import _pair_frame, two_way_rate, two_way_rate_tests
    from analysis.glmm import glmm_pair_tests

    path = REPO / "bench" / "bench_df_rules.py"
    spec = importlib.util.spec_from_file_location("bench_df_rules", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    study = module._study("both", "null", 0)
    rows = module._pairs_study(("both", "null", 0))
    table = two_way_rate_tests(study.main)
    import pandas as pd

    pooled_var, pooled_df = module._pooled_rule(pd.DataFrame(rows))
    np.testing.assert_allclose(pooled_var, table["se"] ** 2, rtol=1e-12)
    np.testing.assert_allclose(pooled_df, table["df"], rtol=1e-12)
    own = [
        two_way_rate(g["win_a"].to_numpy(float), g["participant"], g["image_id"])
        for _, g in _pair_frame(study.main, False).groupby(["condition_a", "condition_b"])
    ]
    np.testing.assert_allclose([r["var_report"] for r in rows], [o["se"] ** 2 for o in own])
    np.testing.assert_allclose([r["df_report"] for r in rows], [o["df"] for o in own])
    rows = module._glmm_study(("both", "null", 0))
    own_fits = glmm_pair_tests(study.main, with_ml=False, test="reml")
    np.testing.assert_allclose([r["df_report"] for r in rows], own_fits["df"], rtol=1e-9)
    np.testing.assert_allclose([r["var"] for r in rows], own_fits["se"] ** 2, rtol=1e-9)
    table = glmm_pair_tests(study.main, with_ml=False)  # the report's: SDs pooled
    np.testing.assert_allclose([r["pooled_var"] for r in rows], table["se"] ** 2, rtol=1e-12)
    np.testing.assert_allclose([r["pooled_df"] for r in rows], table["df"], rtol=1e-12)
    assert not np.allclose(table["se"], own_fits["se"])
    assert all(r["share"].shape == (2,) for r in rows)
    import pandas as pd

    frame = pd.DataFrame(rows)
    scored = module.score(frame, module.glmm_rules(frame)).set_index("rule")
    assert scored.loc["own SDs (previous report): Hessian df, floor G - 1", "fwe"] in (0.0, 1.0)
    report_rule = "report: SDs pooled over the study's pairs, component df, own if beyond"
    assert scored.loc[report_rule, "fwe"] in (0.0, 1.0)
    assert {"study-pooled shares, components df", "components (G_k - 1 each)"} <= set(scored.index)
    output = run_script("bench/bench_df_rules.py", "pairs", "--studies", "2", "--jobs", "1")
    assert "| report: shares pooled over the study's pairs, G - 1 df, own if beyond | null |" in output
    assert "| own pair: V_p + V_i - V_c floored at V_c, Satterthwaite (two_way_rate) |" in output


def test_bench_pair_heterogeneity_scores_the_three_rules():
    """The heterogeneity benchmark runs and prints the report's, the pooled-only and the
    own-pair coverage; a bad argument is a usage error, not a traceback."""
    output = run_script("bench/bench_pair_heterogeneity.py", "--studies", "2", "--glmm")
    for rule in (
        "report (pooled, guarded)",
        "pooled shares alone",
        "own pair (two_way_rate)",
        "GLMM report (pooled SDs, guarded)",
        "GLMM pooled SDs alone",
        "GLMM own SDs (test=reml)",
    ):
        assert re.search(rf"^{re.escape(rule)}\s+coverage [01]\.\d{{3}}", output, re.M), output
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_pair_heterogeneity.py"), "--studies", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2 and "--studies must be >= 1" in done.stderr
    assert "Traceback" not in done.stderr


def test_bench_agreement_null_takes_apart_the_harness_intervals():
    """The metric-agreement diagnostics run on the harness's own studies: their coverage
    column equals ``bench_inference.py``'s for the same seeds; a bad argument is a usage
    error."""
    output = run_script("bench/bench_agreement_null.py", "--studies", "3")
    rows = {
        tuple(cells[:2]): cells
        for cells in (
            [c.strip() for c in line.strip().strip("|").split("|")]
            for line in output.splitlines()
            if line.startswith("| null |") or line.startswith("| effects |")
        )
    }
    assert len(rows) == 8, output
    harness = load_harness()
    table, _ = harness.run_harness(3, n_boot=10, outputs=("metric_agreement",))
    table = table[table["output"] == "metric_agreement: 2AFC score interval"]
    for row in table.itertuples():
        assert float(rows[(row.truth, row.scenario)][2]) == pytest.approx(row.value, abs=5e-4)
    assert "--studies must be >= 2" in usage_error("bench_agreement_null.py", "--studies", "1")


def test_bench_agreement_intervals_scores_every_rule_on_the_harness_studies():
    """The side-by-side benchmark of 2AFC-score intervals runs on the harness's own
    studies: its "report" rows equal ``bench_inference.py``'s coverage of
    metric_agreement and holdout_score for the same seeds, every rule has a row per
    output and truth, and a bad argument is a usage error."""
    output = run_script("bench/bench_agreement_intervals.py", "--studies", "3", "--boot", "50")
    rows = {
        tuple(cells[:3]): cells[3:]
        for cells in (
            [c.strip() for c in line.strip().strip("|").split("|")]
            for line in output.splitlines()
            if re.match(r"^\| (metric_agreement|holdout_score) \|", line)
        )
    }
    assert len(rows) == 2 * 2 * 9, output
    harness = load_harness()
    table, _ = harness.run_harness(3, n_boot=10, outputs=("metric_agreement", "holdout_score"))
    scenarios = list(harness.SCENARIOS)
    for name, output_key in (
        ("metric_agreement: 2AFC score interval", "metric_agreement"),
        ("holdout_score: 2AFC score interval on held-out images", "holdout_score"),
    ):
        for row in table[table["output"] == name].itertuples():
            cell = rows[(output_key, row.truth, "report")][scenarios.index(row.scenario)]
            assert float(cell.split()[0]) == pytest.approx(row.value, abs=5e-4), (name, row)
    assert "--boot must be >= 20" in usage_error("bench_agreement_intervals.py", "--boot", "5")


def test_bench_jnd_heterogeneity_scores_both_rules_per_design():
    """The JND heterogeneity benchmark runs and prints the report's and the own rule's
    coverage for every design and condition; the wild condition keeps its own variance."""
    output = run_script("bench/bench_jnd_heterogeneity.py", "--studies", "3")
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in output.splitlines()
        if re.match(r"^\| (specific|one wild)", line)
    ]
    assert len(rows) == 3 * 6, output
    for cells in rows:
        assert all(0 <= float(v) <= 1 for v in cells[2:]), cells
    wild = [c for c in rows if c[0].startswith("one wild") and c[1] == "q2"]
    assert float(wild[0][4]) > 0.5, output


def test_bench_glmm_pooled_prints_both_tests_and_refuses_bad_scenarios():
    """The pooled-vs-own GLMM benchmark prints a row per scenario and test with rates in
    [0, 1]; an unknown scenario is a usage error naming the valid ones."""
    output = run_script(
        "bench/bench_glmm_pooled.py", "--datasets", "2", "--jobs", "1", "--scenarios", "few-both"
    )
    rows = re.findall(r"^\| few-both \| (.+?) \| (.+) \|$", output, re.M)
    assert [label for label, _ in rows] == [
        "report: SDs pooled over the pairs",
        "own SDs per pair",
    ]
    for _, cells in rows:
        means = [float(cell.split(" ± ")[0]) for cell in cells.split(" | ")]
        assert len(means) == 4 and all(0.0 <= m <= 1.0 for m in means)
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_glmm_pooled.py"), "--scenarios", "nope"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "scenarios must be among" in done.stderr
    assert "Traceback" not in done.stderr
