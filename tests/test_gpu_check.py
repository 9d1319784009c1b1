"""bench/gpu_check.py (issue #16): the one-command GPU check, dry-run on the CPU with tiny
settings, in an interpreter where the web stack cannot be imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]

# any import of the web stack fails in the child interpreter
NO_WEB_STACK = """
import runpy, sys
for name in ("flask", "flask_sqlalchemy", "sqlalchemy", "alembic", "gunicorn", "study_app"):
    sys.modules[name] = None
sys.argv = ["bench/gpu_check.py", *sys.argv[1:]]
runpy.run_path("bench/gpu_check.py", run_name="__main__")
"""


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu_without_the_web_stack(tmp_path):
    out = tmp_path / "check"
    args = ["--device", "cpu", "--steps", "12", "--image-size", "32", "--width", "8",
            "--latent", "16", "--batch-size", "8", "--train-patches", "128", "--n-test", "4",
            "--threads", "1", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-c", NO_WEB_STACK, *args], cwd=REPO, capture_output=True, text=True,
        timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                          "HOME": str(Path.home())},
    )
    assert "ModuleNotFoundError" not in done.stderr and "ImportError" not in done.stderr, (
        done.stderr[-3000:]
    )
    assert done.returncode in (0, 1), done.stderr[-3000:]
    table = pd.read_csv(out / "gpu_check.csv")
    assert list(table.columns) == ["condition", "PSNR dB", "SSIM", "deep", "KL nats",
                                   "images/s", "peak GPU MiB", "guard"]
    assert list(table["condition"]) == ["l2", "ssim", "msssim", "watson-dct", "watson-dft",
                                        "deep"]
    assert table["PSNR dB"].notna().all() and table["KL nats"].gt(0).all()
    assert table["images/s"].gt(0).all() and table["deep"].notna().all()
    assert table["peak GPU MiB"].isna().all()  # CPU: no GPU memory to report
    degenerate = table["guard"].str.startswith("DEGENERATE")
    # twelve steps of a tiny model: the guard may well flag conditions; the exit code
    # must say so exactly when it does
    assert done.returncode == (1 if degenerate.any() else 0), done.stdout
    assert ("FAILED: degenerate" in done.stdout) == bool(degenerate.any())
    assert "| condition | PSNR dB |" in done.stdout and (out / "contact_sheet.png").is_file()
    assert (out / "gpu_check.md").read_text().startswith("| condition |")


def test_gpu_check_defaults_are_the_paper_preset_with_a_short_budget():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO / "bench"))
    config = gpu_check.check_config(gpu_check.parse_args([]))
    first = config["conditions"][0]
    assert (first["architecture"], first["latent"], first["width"]) == ("vae", 256, 64)
    assert config["data"]["image_size"] == 64 and first["batch_size"] == 64
    assert first["kl_target"] == pytest.approx(800)
    assert first["steps"] == 2000 and first["upsample"] == "nearest"
    assert len(config["conditions"]) == 6 and config["guard"]["strict"] is False
