"""Every model × every metric on the test set: PSNR plus each registered loss.

Metrics are computed on the stimuli exactly as written (uint8 PNG pixels → [0, 1]), so
the numbers describe what participants see. PSNR is in dB (higher = more similar); every
loss is a distance (lower = more similar). A metric that cannot be built here (e.g. an
LPIPS backbone whose weights are not on this machine) is skipped with its reason.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import pandas as pd
import torch
from torch import nn

from generation.losses import available_losses, build_loss

PSNR_CAP_DB = 100.0  # identical images would give +inf; report this instead


def psnr(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image (N×C×H×W in [0, 1] → N), capped at 100."""
    mse = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
    return (10.0 * torch.log10(1.0 / mse.clamp_min(10 ** (-PSNR_CAP_DB / 10)))).clamp_max(
        PSNR_CAP_DB
    )


class _PSNR(nn.Module):
    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return psnr(prediction, target)


def build_metrics(
    names: str | Iterable[str], image_size: int, device: torch.device | str = "cpu"
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """``{"psnr": ..., loss name: module}`` and ``{skipped name: reason}``.

    ``names`` is ``"all"`` (every registered loss) or a list of loss names.
    """
    wanted = list(available_losses()) if names == "all" else list(names)
    metrics: dict[str, nn.Module] = {"psnr": _PSNR()}
    skipped: dict[str, str] = {}
    for name in wanted:
        if name == "psnr":
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = build_loss(name)
        except (ValueError, OSError, RuntimeError, ImportError) as error:
            if names != "all" and name not in available_losses():
                raise
            skipped[name] = str(error).splitlines()[0]
            continue
        min_size = getattr(module, "min_size", 1)
        if image_size < min_size:
            skipped[name] = f"needs images of at least {min_size}×{min_size}"
            continue
        metrics[name] = module.to(device).eval()
    return metrics, skipped


@torch.no_grad()
def evaluate_stimuli(
    references: torch.Tensor,
    stimuli: Mapping[str, torch.Tensor],
    image_ids: list[str],
    metrics: Mapping[str, nn.Module],
    device: torch.device | str = "cpu",
    batch_size: int = 64,
) -> pd.DataFrame:
    """Tidy table ``condition, image_id, metric, value`` for uint8 N×C×H×W inputs."""
    rows = []
    for condition, images in stimuli.items():
        for start in range(0, len(image_ids), batch_size):
            ref = references[start : start + batch_size].to(device).float() / 255.0
            out = images[start : start + batch_size].to(device).float() / 255.0
            for metric, module in metrics.items():
                values = module(out, ref).float().cpu().tolist()
                for offset, value in enumerate(values):
                    rows.append((condition, image_ids[start + offset], metric, float(value)))
    return pd.DataFrame(rows, columns=["condition", "image_id", "metric", "value"])


def summary_table(per_image: pd.DataFrame) -> pd.DataFrame:
    """Mean of each metric per condition: one row per condition, one column per metric."""
    order = list(dict.fromkeys(per_image["metric"]))
    table = per_image.pivot_table(
        index="condition", columns="metric", values="value", aggfunc="mean", sort=False
    )
    return table[order].reset_index().rename_axis(columns=None)
