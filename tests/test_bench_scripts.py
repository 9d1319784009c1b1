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


def test_bench_next_latency_prints_both_designs():
    output = run_script("bench/bench_next_latency.py", "--conditions", "3", "--images", "2",
                        "--participants", "2", "--rounds", "1")
    for design in ("balanced", "active"):
        assert re.search(rf"^{design}\s+next: p50\s+[\d.]+ ms", output, re.M), output


def test_bench_votes_next_latency_prints_both_designs():
    output = run_script("bench/bench_votes.py", "--next-latency", "--databases", "sqlite",
                        "--conditions", "3", "--images", "2", "--participants", "4",
                        "--rounds", "2", "--think-s", "0.05")
    for design in ("balanced", "active"):
        for run in ("saturated", "paced"):
            assert re.search(rf"^sqlite\s+{design}\s+{run}\s+8\s+[\d.]+\s+[\d.]+\s+0$",
                             output, re.M), output
