"""Issue #16's CPU acceptance run: the ``paper`` preset's shape at CPU size (``paper-cpu``:
VAE, 32×32, every condition trained to the same rate, resize-convolution decoder,
calibrated Watson starts) passes the degeneracy guard for l2, ssim, msssim, watson-dct,
watson-dft and deep. ~2.5 CPU-minutes on one thread (docs/generation.md has the numbers
and the contact sheet)."""

from __future__ import annotations

import pytest
import torch

from generation.config import resolve_config
from generation.pipeline import generate


@pytest.mark.slow
def test_paper_cpu_run_passes_the_guard_for_every_loss_at_equal_rate(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic: the numbers in docs/generation.md
    try:
        config = resolve_config("paper-cpu")
        assert config["guard"]["strict"]
        # strict: a degenerate condition raises DegenerateStimuliError with the reason
        result = generate(config, tmp_path / "set", device="cpu", progress=False)
    finally:
        torch.set_num_threads(threads)
    conditions = {c["name"]: c for c in result.manifest["conditions"]}
    assert list(conditions) == ["l2", "ssim", "msssim", "watson-dct", "watson-dft", "deep"]
    target = config["conditions"][0]["kl_target"]
    for name, condition in conditions.items():
        guard, rate, metrics = condition["guard"], condition["rate"], condition["metrics"]
        assert guard["ok"], (name, guard)
        # equal rate: the training KL ends at the target, the test images' KL near it
        assert rate["final_kl_mean_last_10pct"] == pytest.approx(target, rel=0.15), (name, rate)
        assert metrics["kl"] == pytest.approx(target, rel=0.3), (name, metrics["kl"])
        # clearly better than the mean image (a collapsed VAE is not)
        assert metrics["psnr"] > guard["stats"]["psnr_mean_image"] + 1.5, (name, metrics)
